"""Database routing for apps: reads to the local replica, writes to the primary.

The gateway decides per request where the app's database work goes and says so in
:data:`latitude.db.current_route`: ``"replica"`` for a read served locally at a replica
region, ``"primary"`` for everything at the primary region, for forwarded requests and for the
local-fallback path (the app then talks to the remote primary database across the ocean).

* :mod:`latitude.db.route` - the route and request of the current task (``ContextVar``s), the
  idempotency claim fence, :class:`WriteOnReplicaError`. No database driver needed.
* SQLAlchemy 2.x (:mod:`latitude.db.engines`): :class:`RoutedEngines` (sync) and
  :class:`AsyncRoutedEngines` (async), both on the ``postgresql+psycopg`` driver.
  ``.engine()`` / ``.session()`` follow the current route.
* Django (:mod:`latitude.db.django_router`): :class:`LatitudeRouter` (``DATABASE_ROUTERS``) and
  :func:`django_databases` (``DATABASES``).

Either way, a write attempted on a replica connection (Postgres SQLSTATE 25006,
``read_only_sql_transaction``) raises :class:`WriteOnReplicaError`, whose message names the
request and says to list its route in ``[routes] always_forward`` in ``latitude.toml``.

The engines and the Django helpers load on first use (``from latitude.db import
RoutedEngines`` works as usual): the gateway needs only the route, not SQLAlchemy (0.3 s and
~17 MB per process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from latitude.db.route import (
    PRIMARY,
    READ_ONLY_SQL_TRANSACTION,
    REPLICA,
    ClaimFence,
    ClaimInTransaction,
    ClaimLost,
    ClaimRefused,
    RequestInfo,
    WriteOnReplicaError,
    claimed,
    claiming,
    current_claim,
    current_request,
    current_route,
    database_urls,
    is_read_only_error,
    request_context,
    route_to_primary,
    route_to_replica,
    routed_request,
)

if TYPE_CHECKING:
    from latitude.db.django_router import (
        LatitudeRouter,
        StrictLatitudeRouter,
        django_database,
        django_databases,
        install_django_write_translation,
    )
    from latitude.db.engines import AsyncRoutedEngines, RoutedEngines, sqlalchemy_url

_LAZY = {
    "AsyncRoutedEngines": "latitude.db.engines",
    "RoutedEngines": "latitude.db.engines",
    "sqlalchemy_url": "latitude.db.engines",
    "LatitudeRouter": "latitude.db.django_router",
    "StrictLatitudeRouter": "latitude.db.django_router",
    "django_database": "latitude.db.django_router",
    "django_databases": "latitude.db.django_router",
    "install_django_write_translation": "latitude.db.django_router",
}

__all__ = [
    "PRIMARY",
    "READ_ONLY_SQL_TRANSACTION",
    "REPLICA",
    "AsyncRoutedEngines",
    "ClaimFence",
    "ClaimInTransaction",
    "ClaimLost",
    "ClaimRefused",
    "LatitudeRouter",
    "RequestInfo",
    "RoutedEngines",
    "StrictLatitudeRouter",
    "WriteOnReplicaError",
    "claimed",
    "claiming",
    "current_claim",
    "current_request",
    "current_route",
    "database_urls",
    "django_database",
    "django_databases",
    "install_django_write_translation",
    "is_read_only_error",
    "request_context",
    "route_to_primary",
    "route_to_replica",
    "routed_request",
    "sqlalchemy_url",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'latitude.db' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
