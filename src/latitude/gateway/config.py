"""Everything a region's gateway needs to know, read once from the topology."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from latitude.signing import Keyring
from latitude.signing.keys import SigningConfigError, keyring_from_topology
from latitude.topology import Region, Topology, TopologyError, load_topology


class GatewayConfigError(Exception):
    pass


EAGER_CLAIM = "eager"
CLAIM_IN_TRANSACTION = "in_transaction"
CLAIM_MODES = (EAGER_CLAIM, CLAIM_IN_TRANSACTION)
# Connections per worker still sending their headers. 256 closed ordinary clients when 256 or
# more connected at once (each one counts from its opening); slow ones are also cut by
# header_timeout_s, so the bound only needs to sit well under the process's file limit.
DEFAULT_MAX_PENDING_HEADERS = 1024
# The forwarding client: "h1" (asyncio protocols and httptools, `latitude.forwarding_h1`) or
# "aiohttp" (`latitude.forwarding.ForwardingClient`, the one measured against).
FORWARDING_CLIENTS = ("h1", "aiohttp")


def _one_of(value: str, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        choices = " or ".join(repr(a) for a in allowed)
        raise GatewayConfigError(f"[gateway] {name} = {value!r}: it must be {choices}")
    return value


@dataclass(frozen=True)
class GatewayConfig:
    topology: Topology
    region: Region
    keyring: Keyring
    deadline_s: float = 3.0
    connect_timeout_s: float = 1.0
    read_wait_s: float = 0.5
    session_limit_bytes: int = 1024 * 1024
    pooling: bool = True
    pool_size: int = 8
    # Forwarded requests in flight at once per worker process (one pooled connection each),
    # and how many more may wait for one before the gateway answers 503 (never a storm).
    max_connections: int = 64
    queue_size: int = 256
    # Forwarded requests the primary runs at once per worker process; the rest wait (at most
    # `queue_size`, and none that could not finish within its budget) or are refused, unrun.
    max_runs: int = 8
    session_cookie: str = "session"
    session_key_template: str = "latitude:session:{sid}"
    consistency: object = "session"
    ca_file: str | None = None
    trusted_proxies: tuple = ()
    # The edge's bounds (docs/gateway.md, "What the gateway refuses").
    max_answer_bytes: int = 64 * 1024 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_headers_bytes: int = 64 * 1024
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_pending_headers: int = DEFAULT_MAX_PENDING_HEADERS
    local_routes: tuple[str, ...] = ()
    always_forward_routes: tuple[str, ...] = ()
    # Stored outcomes of forwarded writes are kept this long (a retry later than that runs
    # anew), purged by the primary's gateway every `idempotency_purge_every_s`.
    idempotency_retention_s: float = 24 * 3600.0
    idempotency_purge_every_s: float = 3600.0
    # Where the primary claims a forwarded write's key: "eager" (its own round trip, before the
    # app runs: safe for any app), or "in_transaction" (in the app's first `latitude.db`
    # transaction: one round trip less; docs/gateway.md says what it asks of the app).
    idempotency_claim: str = "eager"
    forwarding_client: str = "h1"

    @cached_property  # asked for on every request; a config never changes (a promotion swaps it)
    def primary(self) -> Region:
        return self.topology.primary

    @property
    def is_primary(self) -> bool:
        return self.region.primary

    @property
    def primary_url(self) -> str:
        url = self.primary.internal_url or self.primary.public_url
        if not url:
            raise GatewayConfigError(f"the primary region {self.primary.name} has no internal_url")
        return url

    @classmethod
    def from_topology(
        cls,
        topology: Topology,
        region: str,
        environ: Mapping[str, str] | None = None,
        **overrides: object,
    ) -> GatewayConfig:
        environ = os.environ if environ is None else environ
        try:
            this = topology.region(region)
        except KeyError as exc:
            raise GatewayConfigError(str(exc.args[0])) from None
        try:
            keyring = keyring_from_topology(topology, environ)
        except SigningConfigError as exc:
            raise GatewayConfigError(str(exc)) from None
        g = dict(topology.gateway)
        g.update(overrides)

        kinds = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}

        def get(name: str, default, kind=float):
            value = g.get(name, default)
            try:
                return kind(value) if value is not None else None
            except (TypeError, ValueError):
                raise GatewayConfigError(
                    f"[gateway] {name} = {value!r} is not {kinds.get(kind, kind.__name__)}"
                ) from None

        return cls(
            topology=topology,
            region=this,
            keyring=keyring,
            deadline_s=get("deadline_s", 3.0),
            connect_timeout_s=get("connect_timeout_s", 1.0),
            read_wait_s=get("read_wait_s", 0.5),
            session_limit_bytes=get("session_limit_bytes", 1024 * 1024, int),
            pooling=get("pooling", True, bool),
            pool_size=get("pool_size", 8, int),
            max_connections=_positive(get("max_connections", 64, int), "max_connections"),
            queue_size=_positive(get("queue_size", 256, int), "queue_size"),
            max_runs=_positive(get("max_runs", 8, int), "max_runs"),
            session_cookie=get("session_cookie", "session", str),
            session_key_template=get("session_key_template", "latitude:session:{sid}", str),
            consistency=g.get("consistency", "session"),
            ca_file=get("ca_file", environ.get("LATITUDE_CA_FILE"), str),
            trusted_proxies=_networks(g.get("trusted_proxies", [])),
            max_answer_bytes=_positive(
                get("max_answer_bytes", 64 * 1024 * 1024, int), "max_answer_bytes"
            ),
            max_body_bytes=_positive(
                get("max_body_bytes", 64 * 1024 * 1024, int), "max_body_bytes"
            ),
            max_header_bytes=_positive(get("max_header_bytes", 16 * 1024, int), "max_header_bytes"),
            max_headers_bytes=_positive(
                get("max_headers_bytes", 64 * 1024, int), "max_headers_bytes"
            ),
            body_timeout_s=_positive(get("body_timeout_s", 30.0), "body_timeout_s"),
            header_timeout_s=_positive(get("header_timeout_s", 10.0), "header_timeout_s"),
            max_pending_headers=_positive(
                get("max_pending_headers", DEFAULT_MAX_PENDING_HEADERS, int), "max_pending_headers"
            ),
            local_routes=topology.routes.local,
            always_forward_routes=topology.routes.always_forward,
            idempotency_retention_s=_positive(
                get("idempotency_retention_s", 24 * 3600.0), "idempotency_retention_s"
            ),
            idempotency_purge_every_s=_positive(
                get("idempotency_purge_every_s", 3600.0), "idempotency_purge_every_s"
            ),
            idempotency_claim=_one_of(
                get("idempotency_claim", EAGER_CLAIM, str), "idempotency_claim", CLAIM_MODES
            ),
            forwarding_client=_one_of(
                get("forwarding_client", "h1", str), "forwarding_client", FORWARDING_CLIENTS
            ),
        )

    @classmethod
    def from_environment(
        cls, region: str | None = None, topology_path: str | None = None, **overrides: object
    ):
        """Config from `LATITUDE_TOPOLOGY` / `LATITUDE_REGION` (what `latitude serve` and the lab set)."""
        path = topology_path or os.environ.get("LATITUDE_TOPOLOGY", "latitude.toml")
        region = region or os.environ.get("LATITUDE_REGION")
        if not region:
            raise GatewayConfigError("no region given; pass --region or set LATITUDE_REGION")
        try:
            topology = load_topology(path)
        except TopologyError:
            raise
        return cls.from_topology(topology, region, **overrides)


def _positive(value, name: str):
    if value is None or value <= 0:
        raise GatewayConfigError(f"[gateway] {name} = {value!r} must be a positive number")
    return value


def _networks(value: object) -> tuple:
    import ipaddress

    if not isinstance(value, list):
        raise GatewayConfigError('[gateway] trusted_proxies must be a list like ["10.0.0.0/8"]')
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in value)
    except (TypeError, ValueError) as exc:
        raise GatewayConfigError(
            f'[gateway] trusted_proxies: {exc}; write CIDRs like "10.0.0.0/8"'
        ) from None
