"""Which way a request goes. One function, one fixed order, documented here and in the docs:

1. Latitude's own endpoints (`/_latitude/...`): answered by the gateway itself.
2. A request that arrives forwarded from another region (it carries a Latitude signature):
   verified, then run here (only the primary accepts these).
3. At the primary region everything else runs locally.
4. Routes listed `local` in `[routes]`: run in this region, whatever the method.
5. Routes listed `always_forward`: forwarded to the primary, whatever the method.
6. The method: GET, HEAD and OPTIONS are reads, served here; everything else is forwarded.
"""

from __future__ import annotations

import enum
from fnmatch import fnmatchcase

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LATITUDE_PREFIX = "/_latitude/"
FORWARDED_FROM_HEADER = "latitude-forwarded-from"


class Decision(enum.Enum):
    LATITUDE = "latitude"  # the gateway's own endpoint
    VERIFY = "verify"  # forwarded from a replica region: verify, then run at the primary
    PRIMARY = "primary"  # this is the primary region: run here against the primary database
    LOCAL = "local"  # run in this (replica) region against its replica
    FORWARD = "forward"  # carry to the primary region


def route_matches(path: str, patterns: tuple[str, ...]) -> bool:
    """`/auth/*` matches below `/auth/`; a pattern without `*` matches exactly."""
    return any(fnmatchcase(path, p) for p in patterns)


def classify(
    method: str,
    path: str,
    *,
    is_primary: bool,
    forwarded: bool,
    local: tuple[str, ...] = (),
    always_forward: tuple[str, ...] = (),
) -> Decision:
    if path.startswith(LATITUDE_PREFIX):
        return Decision.LATITUDE
    if forwarded:
        return Decision.VERIFY
    if is_primary:
        return Decision.PRIMARY
    if route_matches(path, local):
        return Decision.LOCAL
    if route_matches(path, always_forward):
        return Decision.FORWARD
    return Decision.LOCAL if method.upper() in SAFE_METHODS else Decision.FORWARD
