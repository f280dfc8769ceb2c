"""Checking a parsed topology file, key by key, into a :class:`~latitude.topology.Topology`.

Every key the file may hold is listed here; every problem found becomes one line naming the key
and saying how to fix it, and all of them are raised at once as one `TopologyError`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import urlsplit

from latitude.topology import (
    LinkSpec,
    Region,
    Routes,
    SigningKeySpec,
    Topology,
    TopologyError,
)

MIN_SECRET_BYTES = 32

HTTP_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("postgresql", "postgres")
SESSION_STORE_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "unix", "memory")

# Every key the file may hold, per table. A key outside these is a typo until proven otherwise.
TOP_LEVEL_KEYS = {
    "app",
    "regions",
    "signing",
    "routes",
    "links",
    "gateway",
    "mirror",
    "routing",
    "lab",
    "replication",
    "failover",
}
REGION_KEYS = {
    "name",
    "primary",
    "location",
    "public_url",
    "internal_url",
    "database_url",
    "primary_database_url",
    "session_store_url",
    "mirror_url",
    "services",
}
# What a region may run, and the keys each service needs (`services = ["mirror"]` for a
# region that only mirrors, as packagist's mirrors do). Without `services`, a region runs the
# app, plus the mirror when it has a mirror_url.
SERVICE_KEYS: dict[str, tuple[str, ...]] = {
    "app": ("public_url", "internal_url", "database_url", "session_store_url"),
    "mirror": ("mirror_url",),
}
TABLE_KEYS: dict[str, set[str]] = {
    "app": {"name"},
    "signing": {"keys", "sign_with"},
    "signing.keys": {"id", "env"},
    "routes": {"local", "always_forward"},
    "links": {"default_rtt_ms", "jitter_ms", "rtt"},
    "links.rtt": {"between", "rtt_ms", "jitter_ms"},
    "gateway": {
        "deadline_s",
        "connect_timeout_s",
        "read_wait_s",
        "session_limit_bytes",
        "pooling",
        "pool_size",
        "max_connections",
        "queue_size",
        "max_runs",
        "session_cookie",
        "session_key_template",
        "consistency",
        "ca_file",
        "tls_cert",
        "tls_key",
        "workers",
        "trusted_proxies",
        "max_answer_bytes",
        "max_body_bytes",
        "max_header_bytes",
        "max_headers_bytes",
        "body_timeout_s",
        "header_timeout_s",
        "max_pending_headers",
        "idempotency_retention_s",
        "idempotency_purge_every_s",
        "idempotency_claim",
        "forwarding_client",
    },
    "mirror": {"root", "indexes", "retention_s", "max_lag_s", "poll_timeout_s", "paths"},
    "routing": {
        "zone",
        "name",
        "ttl_s",
        "check_interval_s",
        "check_threshold",
        "check_path",
        "history_path",
        *("check_timeout_s", "check_quorum", "check_services", "addresses", "cidrs", "geoip_path"),
        "primary_names",
        *("check_window", "check_rise", "check_suspect_interval_s", "suspect_ttl_s"),
    },
    "lab": {"state_dir"},
    "replication": {"synchronous"},
    "failover": {"automatic", "after_s", "lease_s", "hold_s", "peer_poll_s", "max_lag_bytes"},
}


class Validator:
    def __init__(self, source: str, environ: Mapping[str, str], secrets: bool = True):
        self.source = source
        self.environ = environ
        self.secrets = secrets
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def check_keys(self, where: str, table: Mapping[str, object], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else f"allowed: {', '.join(sorted(allowed))}"
                )
                self.problem(f"{where}.{key}" if where else key, f"unknown key; {hint}")

    def table(self, data: Mapping[str, object], name: str) -> dict[str, object]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.problem(name, f"must be a table, like [{name}]")
            return {}
        self.check_keys(name, value, TABLE_KEYS[name])
        return value

    def number(self, where: str, value: object, *, minimum: float = 0.0) -> float | None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.problem(where, f"must be a number, got {value!r}")
            return None
        if value < minimum:
            self.problem(where, f"must be at least {minimum:g}, got {value!r}")
            return None
        return float(value)

    def url(self, where: str, value: object, schemes: tuple[str, ...], example: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.problem(where, f"must be a URL string like {example}")
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            self.problem(where, f"{value!r} is not a valid URL ({exc}); write it like {example}")
            return None
        if parts.scheme not in schemes:
            self.problem(
                where,
                f"{value!r} must use {' or '.join(s + '://' for s in schemes)}; "
                f"write it like {example}",
            )
            return None
        if parts.scheme not in ("unix", "memory") and not parts.hostname:
            self.problem(where, f"{value!r} has no host; write it like {example}")
            return None
        return value

    def build(self, data: dict[str, object]) -> Topology:
        self.check_keys("", data, TOP_LEVEL_KEYS)
        is_lab = "lab" in data
        if is_lab:
            self.table(data, "lab")
        regions = self.regions(data.get("regions"), is_lab)
        names = {r.name for r in regions}
        keys, sign_with = self.signing(self.table(data, "signing"), is_lab)
        routes = self.routes(self.table(data, "routes"))
        default_rtt, links = self.links(self.table(data, "links"), names)
        app = self.table(data, "app")
        gateway = self.table(data, "gateway")
        mirror = self.table(data, "mirror")
        routing = self.table(data, "routing")
        replication = self.replication(self.table(data, "replication"), len(regions))
        failover = self.failover(self.table(data, "failover"))
        if self.problems:
            raise TopologyError(self.source, self.problems)
        return Topology(
            regions=tuple(regions),
            signing_keys=tuple(keys),
            sign_with=sign_with,
            routes=routes,
            links=tuple(links),
            default_rtt_ms=default_rtt,
            gateway=gateway,
            mirror=mirror,
            routing=routing,
            replication=replication,
            failover=failover,
            app_name=str(app.get("name", "app")),
            is_lab=is_lab,
            source=self.source,
        )

    def replication(self, table: dict[str, object], n_regions: int) -> dict[str, object]:
        k = table.get("synchronous", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            self.problem(
                "replication.synchronous",
                f"must be a whole number of replica regions (0 = async), got {k!r}",
            )
        elif n_regions and k > n_regions - 1:
            self.problem(
                "replication.synchronous",
                f"{k} but there are only {n_regions - 1} replica regions; "
                f"use at most {n_regions - 1}",
            )
        return table

    def failover(self, table: dict[str, object]) -> dict[str, object]:
        if "automatic" in table and not isinstance(table["automatic"], bool):
            self.problem("failover.automatic", "must be true or false")
        for key in ("after_s", "lease_s", "hold_s", "peer_poll_s", "max_lag_bytes"):
            if key in table:
                self.number(f"failover.{key}", table[key])
        return table

    def regions(self, raw: object, is_lab: bool) -> list[Region]:
        if raw is None:
            self.problem("regions", "no regions; add at least one [[regions]] table with a name")
            return []
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            self.problem("regions", "must be an array of tables: write each region as [[regions]]")
            return []
        regions: list[Region] = []
        seen: dict[str, str] = {}
        for i, r in enumerate(raw, start=1):
            where = f"regions[{i}]"
            self.check_keys(where, r, REGION_KEYS)
            name = r.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
                self.problem(
                    f"{where}.name",
                    f"{name!r} is not a region name; use lowercase letters, digits and '-', "
                    'like name = "eu-west"',
                )
                continue
            where = f"regions[{i}] ({name})"
            if name in seen:
                self.problem(
                    f"{where}.name",
                    f"duplicate region {name!r}, already defined by {seen[name]}; "
                    "give each region a unique name",
                )
                continue
            seen[name] = where
            primary = r.get("primary", False)
            if not isinstance(primary, bool):
                self.problem(f"{where}.primary", "must be true or false")
                primary = False
            lat, lon = self.location(where, r.get("location"))
            services = self.services(where, r)
            for service in () if is_lab else services:
                for key in SERVICE_KEYS[service]:
                    if key not in r:
                        self.problem(
                            f"{where}.{key}",
                            f"missing; a region that runs the {service} needs {key}"
                            + (
                                ' (a region that only mirrors: services = ["mirror"])'
                                if service == "app"
                                else ""
                            ),
                        )
            regions.append(
                Region(
                    name=name,
                    primary=primary,
                    latitude=lat,
                    longitude=lon,
                    public_url=self.url(
                        f"{where}.public_url",
                        r.get("public_url"),
                        HTTP_SCHEMES,
                        f"https://{name}.example.com",
                    ),
                    internal_url=self.url(
                        f"{where}.internal_url",
                        r.get("internal_url"),
                        HTTP_SCHEMES,
                        f"https://{name}.internal:8443",
                    ),
                    database_url=self.url(
                        f"{where}.database_url",
                        r.get("database_url"),
                        DATABASE_SCHEMES,
                        f"postgresql://app@db.{name}.internal:5432/app",
                    ),
                    primary_database_url=self.url(
                        f"{where}.primary_database_url",
                        r.get("primary_database_url"),
                        DATABASE_SCHEMES,
                        "postgresql://app@primary-db.internal:5432/app",
                    ),
                    session_store_url=self.url(
                        f"{where}.session_store_url",
                        r.get("session_store_url"),
                        SESSION_STORE_SCHEMES,
                        f"redis://sessions.{name}.internal:6379/0",
                    ),
                    mirror_url=self.url(
                        f"{where}.mirror_url",
                        r.get("mirror_url"),
                        HTTP_SCHEMES,
                        f"https://mirror.{name}.example.com",
                    ),
                    services=services,
                )
            )
        primaries = [r.name for r in regions if r.primary]
        if regions and not primaries:
            self.problem("regions", "no primary region; set primary = true on exactly one region")
        elif len(primaries) > 1:
            self.problem(
                "regions",
                f"{len(primaries)} primary regions ({', '.join(primaries)}); "
                "set primary = true on exactly one",
            )
        # A replica's fallback path needs the primary's database; default to the primary's own URL.
        primary_db = next((r.database_url for r in regions if r.primary), None)
        return [
            r
            if r.primary or r.primary_database_url or not primary_db
            else replace(r, primary_database_url=primary_db)
            for r in regions
        ]

    def services(self, where: str, r: Mapping[str, object]) -> tuple[str, ...]:
        raw = r.get("services")
        if raw is None:
            return ("app", "mirror") if "mirror_url" in r else ("app",)
        known = ", ".join(f'"{s}"' for s in SERVICE_KEYS)
        if (
            not isinstance(raw, list)
            or not raw
            or not all(isinstance(s, str) and s in SERVICE_KEYS for s in raw)
        ):
            self.problem(
                f"{where}.services",
                f'must be a non-empty list of {known}, like services = ["mirror"]; got {raw!r}',
            )
            return ("app",)
        return tuple(dict.fromkeys(raw))

    def location(self, where: str, raw: object) -> tuple[float, float]:
        example = "location = [53.35, -6.26] (latitude, longitude in degrees)"
        if raw is None:
            self.problem(f"{where}.location", f"missing; write {example}")
            return 0.0, 0.0
        if not isinstance(raw, list) or len(raw) != 2:
            self.problem(f"{where}.location", f"must be [latitude, longitude]; write {example}")
            return 0.0, 0.0
        lat = self.number(f"{where}.location[0]", raw[0], minimum=-90)
        lon = self.number(f"{where}.location[1]", raw[1], minimum=-180)
        if lat is not None and lat > 90:
            self.problem(f"{where}.location[0]", f"latitude {lat:g} is outside -90..90")
        if lon is not None and lon > 180:
            self.problem(f"{where}.location[1]", f"longitude {lon:g} is outside -180..180")
        return lat or 0.0, lon or 0.0

    def signing(
        self, table: dict[str, object], is_lab: bool
    ) -> tuple[list[SigningKeySpec], str | None]:
        raw = table.get("keys", [])
        if not isinstance(raw, list) or not all(isinstance(k, dict) for k in raw):
            self.problem(
                "signing.keys", 'must be an array like [{ id = "k1", env = "LATITUDE_KEY_K1" }]'
            )
            return [], None
        keys: list[SigningKeySpec] = []
        for i, k in enumerate(raw, start=1):
            where = f"signing.keys[{i}]"
            self.check_keys(where, k, TABLE_KEYS["signing.keys"])
            key_id, env = k.get("id"), k.get("env")
            if not isinstance(key_id, str) or not key_id:
                self.problem(f"{where}.id", 'missing; give the key an id like id = "k1"')
                continue
            if not isinstance(env, str) or not env:
                self.problem(
                    f"{where}.env",
                    "missing; name the environment variable holding the secret, like "
                    'env = "LATITUDE_KEY_K1" (secrets are never stored in the file)',
                )
                continue
            value = self.environ.get(env)
            secret = value.encode() if value else None
            # The lab generates its own secrets, so a lab topology may name unset variables.
            if not is_lab and self.secrets:
                if secret is None:
                    self.problem(
                        f"{where} ({key_id})",
                        f"secret missing: environment variable {env} is not set; "
                        f"set it to a random string of at least {MIN_SECRET_BYTES} bytes, "
                        f"e.g. `export {env}=$(openssl rand -base64 48)`",
                    )
                elif len(secret) < MIN_SECRET_BYTES:
                    self.problem(
                        f"{where} ({key_id})",
                        f"secret in {env} is {len(secret)} bytes; it must be at least "
                        f"{MIN_SECRET_BYTES} bytes (e.g. `openssl rand -base64 48`)",
                    )
            keys.append(SigningKeySpec(key_id, env, secret))
        sign_with = table.get("sign_with")
        ids = [k.id for k in keys]
        if sign_with is None and keys:
            sign_with = keys[0].id
        elif sign_with is not None and sign_with not in ids:
            self.problem(
                "signing.sign_with",
                f"{sign_with!r} is not one of the keys ({', '.join(ids) or 'none'})",
            )
        if not keys and not is_lab:
            self.problem(
                "signing.keys",
                'no signing key; add [[signing.keys]] with id = "k1" and env = "LATITUDE_KEY_K1"',
            )
        return keys, sign_with if isinstance(sign_with, str) else None

    def routes(self, table: dict[str, object]) -> Routes:
        out: dict[str, tuple[str, ...]] = {}
        for key in ("local", "always_forward"):
            raw = table.get(key, [])
            if not isinstance(raw, list) or not all(
                isinstance(p, str) and p.startswith("/") for p in raw
            ):
                self.problem(
                    f"routes.{key}", 'must be a list of paths starting with "/", like ["/auth/*"]'
                )
                raw = []
            out[key] = tuple(raw)
        return Routes(**out)

    def links(self, table: dict[str, object], names: set[str]) -> tuple[float, list[LinkSpec]]:
        default = self.number("links.default_rtt_ms", table.get("default_rtt_ms", 100)) or 100.0
        jitter = self.number("links.jitter_ms", table.get("jitter_ms", 0)) or 0.0
        raw = table.get("rtt", [])
        if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
            self.problem("links.rtt", "must be an array of tables: write each as [[links.rtt]]")
            return default, []
        links: list[LinkSpec] = []
        for i, x in enumerate(raw, start=1):
            where = f"links.rtt[{i}]"
            self.check_keys(where, x, TABLE_KEYS["links.rtt"])
            between = x.get("between")
            if (
                not isinstance(between, list)
                or len(between) != 2
                or not all(isinstance(b, str) for b in between)
                or between[0] == between[1]
            ):
                self.problem(
                    f"{where}.between",
                    'must name two regions, like between = ["us-west", "eu-west"]',
                )
                continue
            for b in between:
                if names and b not in names:
                    self.problem(
                        f"{where}.between",
                        f"unknown region {b!r}; known: {', '.join(sorted(names))}",
                    )
            rtt = self.number(f"{where}.rtt_ms", x.get("rtt_ms"))
            j = self.number(f"{where}.jitter_ms", x.get("jitter_ms", jitter))
            if rtt is not None and j is not None:
                links.append(LinkSpec(between[0], between[1], rtt, j))
        return default, links
