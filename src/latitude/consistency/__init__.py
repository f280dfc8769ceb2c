"""Read-your-writes across regions: Postgres replication positions, stamped and waited for.

After a write at the primary the response carries the primary's WAL position (an LSN and its
timeline); the replica region keeps it in a signed cookie, and a later read there waits
(bounded) until the local replica has replayed that position, or is forwarded to the primary.
Other systems pin a user to the primary for a fixed 2, 5 or 15 s after a write; a position is
both faster (a read waits only as long as replication actually lags) and a guarantee (a time
window is a guess).

* :mod:`.position` - :class:`ReplicationPosition` (``00000002/16/B374D848``: timeline and LSN;
  parse, format, order) and :func:`primary_position` / :func:`primary_position_async`.
* :mod:`.cookie` - :class:`PositionCookie`: the position in an HMAC-signed, expiring cookie.
* :mod:`.watcher` - :class:`ReplayWatcher`, ONE per process: follows the local replica's replay
  position and wakes waiting reads when it arrives. A read without a pending position costs no
  query.
* :mod:`.policy` - :class:`ConsistencyMode`, :class:`ConsistencyPolicy` (per-route modes),
  :class:`StrongPositionSource` and :func:`read_locally`, the one read decision.

The route of the current request (``current_route``, ``route_to_primary``, ``claimed``,
``WriteOnReplicaError``...) lives in :mod:`latitude.db.route` (import it from :mod:`latitude.db`).
"""

from __future__ import annotations

from latitude.consistency.cookie import CookieClaim, PositionCookie
from latitude.consistency.policy import (
    ConsistencyMode,
    ConsistencyPolicy,
    StrongPositionSource,
    read_locally,
)
from latitude.consistency.position import (
    POSITION_SQL,
    Reach,
    ReplicationPosition,
    primary_position,
    primary_position_async,
    reach,
)
from latitude.consistency.watcher import WAIT_BUCKETS_MS, ReplayWatcher

__all__ = [
    "POSITION_SQL",
    "WAIT_BUCKETS_MS",
    "ConsistencyMode",
    "ConsistencyPolicy",
    "CookieClaim",
    "PositionCookie",
    "Reach",
    "ReplayWatcher",
    "ReplicationPosition",
    "StrongPositionSource",
    "primary_position",
    "primary_position_async",
    "reach",
    "read_locally",
]
