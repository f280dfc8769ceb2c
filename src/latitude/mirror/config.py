"""A node's mirror settings, from the topology's `[mirror]` table and the region it runs in.

[mirror]
root = "/srv/mirror"              # content root; "{region}" is replaced by the region name
paths = ["/simple/", "/packages/"]  # URL prefixes that are mirrored; others go to the website
indexes = ["simple/*", "*.json"]  # files written after the files they name (fnmatch, * spans /)
retention_s = 86400               # how long the primary's change log remembers
max_lag_s = 60                    # health answers 503 beyond this many seconds behind
poll_timeout_s = 25               # how long a long poll is held open
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from latitude import signing
from latitude.mirror.changelog import DEFAULT_RETENTION_S
from latitude.mirror.sync import DEFAULT_INDEXES
from latitude.signing.keys import SigningConfigError, keyring_from_topology
from latitude.topology import Topology

DEFAULT_MAX_LAG_S = 60.0
DEFAULT_POLL_TIMEOUT_S = 25.0


class MirrorConfigError(ValueError):
    """The settings do not allow running this node; the message says what to set."""


@dataclass(frozen=True)
class MirrorConfig:
    region: str
    is_primary: bool
    root: Path
    listen_host: str
    listen_port: int
    primary_url: str | None  # the primary's mirror, as reached from this region
    website_url: str | None  # where non-mirrored paths go (the primary's website)
    keyring: signing.Keyring | None
    paths: tuple[str, ...] = ("/",)
    indexes: tuple[str, ...] = DEFAULT_INDEXES
    retention_s: float = DEFAULT_RETENTION_S
    max_lag_s: float = DEFAULT_MAX_LAG_S
    poll_timeout_s: float = DEFAULT_POLL_TIMEOUT_S

    @classmethod
    def from_topology(
        cls,
        topology: Topology,
        region: str,
        root: str | os.PathLike[str] | None = None,
        *,
        signed: bool = True,
    ) -> MirrorConfig:
        """`signed=False` is for tools that sign nothing (publish, nginx-config): no keyring."""
        r = topology.region(region)
        primary = topology.primary
        m = topology.mirror
        raw_root = root if root is not None else m.get("root")
        if raw_root is None:
            raise MirrorConfigError(
                f'no content root for {region}: set root = "/srv/mirror" in the [mirror] table '
                "of the topology, or pass --root DIR"
            )
        if not r.mirror_url:
            raise MirrorConfigError(
                f'region {region} has no mirror_url; add mirror_url = "https://mirror.{region}.example.com"'
            )
        listen = urlsplit(r.mirror_url)
        if not primary.mirror_url and not r.primary:
            raise MirrorConfigError(
                f"the primary region {primary.name} has no mirror_url to sync from"
            )
        return cls(
            region=region,
            is_primary=r.primary,
            root=Path(str(raw_root).replace("{region}", region)).absolute(),
            listen_host=listen.hostname or "127.0.0.1",
            listen_port=listen.port or (443 if listen.scheme == "https" else 80),
            primary_url=primary.mirror_url,
            website_url=primary.internal_url or primary.public_url,
            keyring=mirror_keyring(topology) if signed else None,
            paths=tuple(m.get("paths", ("/",))),
            indexes=tuple(m.get("indexes", DEFAULT_INDEXES)),
            retention_s=float(m.get("retention_s", DEFAULT_RETENTION_S)),
            max_lag_s=float(m.get("max_lag_s", DEFAULT_MAX_LAG_S)),
            poll_timeout_s=float(m.get("poll_timeout_s", DEFAULT_POLL_TIMEOUT_S)),
        )


def mirror_keyring(topology: Topology) -> signing.Keyring:
    """The region keyring the feed is signed and verified with; never none (fail closed)."""
    try:
        return keyring_from_topology(topology)
    except SigningConfigError as exc:
        raise MirrorConfigError(
            f"{exc}. The mirror's change feed is always signed: it does not run without it"
        ) from None
