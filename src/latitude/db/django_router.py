"""Django routing: ``DATABASES`` from a topology (:func:`django_databases`), the routers
(:class:`LatitudeRouter`, :class:`StrictLatitudeRouter`), and two execute wrappers: the
translation of Postgres' read-only error into :class:`~latitude.db.route.WriteOnReplicaError`
and the claim's fence. Django is imported only when one of these is used."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from psycopg.pq import TransactionStatus

from latitude.db.route import (
    PRIMARY,
    REPLICA,
    ClaimFence,
    WriteOnReplicaError,
    current_claim,
    current_route,
    database_urls,
    error_line,
    is_read_only_error,
    mark_claim,
)

if TYPE_CHECKING:
    from latitude.topology import Topology

__all__ = [
    "LatitudeRouter",
    "StrictLatitudeRouter",
    "django_database",
    "django_databases",
    "install_django_write_translation",
]

_PG_SCHEMES = ("postgresql", "postgres")


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
            detail=f"{error_line(exc)} (Django database {alias!r})", statement=str(sql)
        ) from exc


def _django_fence(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
    """A Django execute wrapper: the fence (docs/gateway.md, "Fencing") for Django. While a
    claimed request runs (the gateway sets `current_claim`), the first statement of each
    transaction on the primary database (`"default"`) is preceded by the claim's mark, in the
    same transaction, so the mark commits with the app's writes or not at all; a mark that
    finds the claim no longer this run's refuses the transaction (`ClaimLost`) before the app's
    statement is sent. In autocommit mode (Django's default, outside `atomic()`) a statement is
    its own transaction: one that is not a plain SELECT is run as BEGIN, mark, statement,
    COMMIT."""
    fence = current_claim.get()
    connection = context.get("connection") if context else None
    raw = getattr(connection, "connection", None)
    if (
        not isinstance(fence, ClaimFence)
        or current_route.get() != PRIMARY
        or getattr(connection, "alias", None) != LatitudeRouter.primary_alias
        or raw is None
        or raw.info.transaction_status != TransactionStatus.IDLE  # already marked
    ):
        return execute(sql, params, many, context)
    if not raw.autocommit:  # this statement opens the transaction: the mark goes first
        mark_claim(raw, fence)
        return execute(sql, params, many, context)
    if str(sql).lstrip()[:6].lower() == "select":
        return execute(sql, params, many, context)  # a read on its own writes nothing
    raw.execute("begin")
    try:
        mark_claim(raw, fence)
        result = execute(sql, params, many, context)
    except BaseException:
        with contextlib.suppress(Exception):  # a broken connection: the server rolls back
            raw.execute("rollback")
        raise
    raw.execute("commit")
    return result


def _add_django_wrapper(connection: Any) -> None:
    if _django_fence not in connection.execute_wrappers:
        connection.execute_wrappers.append(_django_fence)
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
