"""Database routing for apps: reads to the local replica, writes to the primary.

The gateway decides per request where the app's database work goes and says so in
:data:`latitude.consistency.current_route`: ``"replica"`` for a read served locally at a replica
region, ``"primary"`` for everything at the primary region, for forwarded requests and for the
local-fallback path (the app then talks to the remote primary database across the ocean).

* SQLAlchemy 2.x: :class:`RoutedEngines` (sync) and :class:`AsyncRoutedEngines` (async), both on
  the ``postgresql+psycopg`` driver. ``.engine()`` / ``.session()`` follow the current route.
* Django: :class:`LatitudeRouter` (``DATABASE_ROUTERS``) and :func:`django_databases`
  (``DATABASES``).

Either way, a write attempted on a replica connection (Postgres SQLSTATE 25006,
``read_only_sql_transaction``) raises :class:`WriteOnReplicaError`, whose message names the
request and says to list its route in ``[routes] always_forward`` in ``latitude.toml``.

Django is optional: nothing here imports it until a Django function or the router is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from latitude.consistency import (
    PRIMARY,
    REPLICA,
    ClaimLost,
    WriteOnReplicaError,
    current_claim,
    current_route,
)

if TYPE_CHECKING:
    from latitude.topology import Topology

__all__ = [
    "AsyncRoutedEngines",
    "LatitudeRouter",
    "RoutedEngines",
    "StrictLatitudeRouter",
    "WriteOnReplicaError",
    "database_urls",
    "django_database",
    "django_databases",
    "install_django_write_translation",
    "is_read_only_error",
    "sqlalchemy_url",
]

READ_ONLY_SQL_TRANSACTION = "25006"
_PG_SCHEMES = ("postgresql", "postgres")


# ---- shared --------------------------------------------------------------------------------


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


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


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


# ---- SQLAlchemy ----------------------------------------------------------------------------


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
            detail=_first_line(ctx.original_exception), statement=ctx.statement
        ) from ctx.sqlalchemy_exception


def _fence_claim(conn: Any) -> None:
    """``begin`` listener on the primary engine: inside a claimed request (the gateway sets
    :data:`~latitude.consistency.current_claim`), mark the claim applied as the transaction's
    first statement, so the mark commits with the app's writes or not at all. Run on the DBAPI
    connection: the driver opens the transaction with it, and SQLAlchemy's own begin is not
    re-entered."""
    fence = current_claim.get()
    if fence is None or current_route.get() != PRIMARY:
        return
    from latitude.idempotency import fence_statement

    sql, params = fence_statement(fence.key, fence.started_at, fence.idle_timeout_s)
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.execute(sql, params)
        (marked, *_) = cursor.fetchone()
    finally:
        cursor.close()
    if marked != 1:
        raise ClaimLost(fence.key)


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
    :data:`~latitude.consistency.current_route`.

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


# ---- Django --------------------------------------------------------------------------------


def django_database(
    url: str, *, conn_max_age: int | None = 60, health_checks: bool = True
) -> dict[str, Any]:
    """One ``DATABASES`` entry (``django.db.backends.postgresql``, psycopg 3) from a
    ``postgresql://user:password@host:port/name?option=value`` URL; query options go to
    ``OPTIONS`` (``sslmode``, ``connect_timeout``...; ``host`` for a Unix socket folder)."""
    parts = urlsplit(url)
    scheme = parts.scheme.partition("+")[0]
    if scheme not in _PG_SCHEMES:
        raise ValueError(
            f"{url!r} is not a Postgres URL; write it like postgresql://app@db.internal:5432/app"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} has a bad port: {exc}") from None
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    host = unquote(parts.hostname or "") or options.pop("host", "")
    name = unquote(parts.path.lstrip("/")) or options.pop("dbname", "")
    if not name:
        raise ValueError(f"{url!r} names no database; end it with /DBNAME")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": host,
        "PORT": str(port or ""),
        "OPTIONS": options,
        # Persistent connections: a connection to a remote primary costs several round trips.
        "CONN_MAX_AGE": conn_max_age,
        # ...checked before reuse, so a connection that died quietly is replaced, not failed on.
        "CONN_HEALTH_CHECKS": health_checks,
    }


def django_databases(
    topology: Topology, region_name: str, *, conn_max_age: int | None = 60
) -> dict[str, dict[str, Any]]:
    """``DATABASES`` for a Django app running in ``region_name``: ``"default"`` is the primary
    (remote at a replica region) and ``"replica"`` the local database. Use with
    ``DATABASE_ROUTERS = ["latitude.db.LatitudeRouter"]``."""
    local, primary = database_urls(topology, region_name)
    replica = django_database(local, conn_max_age=conn_max_age)
    # Django's test runner: no separate test database for the replica, it mirrors "default".
    replica["TEST"] = {"MIRROR": "default"}
    return {"default": django_database(primary, conn_max_age=conn_max_age), "replica": replica}


def _django_translate(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
    """A Django execute wrapper: 25006 from the database becomes WriteOnReplicaError."""
    try:
        return execute(sql, params, many, context)
    except Exception as exc:
        if not is_read_only_error(exc):
            raise
        alias = getattr(context.get("connection"), "alias", "?") if context else "?"
        raise WriteOnReplicaError(
            detail=f"{_first_line(exc)} (Django database {alias!r})", statement=str(sql)
        ) from exc


def _add_django_wrapper(connection: Any) -> None:
    if _django_translate not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, _django_translate)


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    _add_django_wrapper(connection)


def install_django_write_translation() -> None:
    """Translate Postgres' read-only error into :class:`WriteOnReplicaError` on every Django
    connection (an execute wrapper added as each connection opens). Idempotent; the routers
    below call it, so apps using them need nothing more."""
    from django.db import connections
    from django.db.backends.signals import connection_created

    connection_created.connect(
        _on_connection_created, weak=False, dispatch_uid="latitude-write-on-replica"
    )
    for conn in connections.all(initialized_only=True):
        _add_django_wrapper(conn)


class LatitudeRouter:
    """Django database router: reads go to ``"replica"`` when the gateway routed the request
    to the replica, otherwise to ``"default"`` (the primary); writes always to ``"default"``;
    migrations only on ``"default"``.

    At a replica region an ORM write during a GET therefore crosses the ocean to the primary
    (it works, slowly, and is not forwarded idempotently); :class:`StrictLatitudeRouter` turns it
    into a :class:`WriteOnReplicaError` instead.
    """

    replica_alias = "replica"
    primary_alias = "default"

    def __init__(self) -> None:
        install_django_write_translation()

    def _on_replica(self) -> bool:
        return current_route.get() == REPLICA

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return self.replica_alias if self._on_replica() else self.primary_alias

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return self.primary_alias

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None, **hints: Any):
        return db == self.primary_alias


class StrictLatitudeRouter(LatitudeRouter):
    """:class:`LatitudeRouter` whose writes, on the replica route, go to the replica: a GET that
    writes fails at once with :class:`WriteOnReplicaError` (naming the route and
    ``always_forward``) instead of quietly writing across the ocean. Recommended in development
    and tests, to find the routes to list in ``[routes] always_forward``."""

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return self.replica_alias if self._on_replica() else self.primary_alias
