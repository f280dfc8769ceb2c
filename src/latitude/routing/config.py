"""The `[routing]` table of the topology file, with defaults, validated into `RoutingConfig`.

Every key is optional. Problems are collected, each naming its key and the fix, and raised
together as one `RoutingConfigError`, like the topology loader does.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from latitude.topology import Topology

DEFAULT_ZONE = "latitude.test."
DEFAULT_TTL_S = 30
DEFAULT_INTERVAL_S = 1.0
# Down after THRESHOLD failures among a vantage point's last WINDOW results (one lost probe is
# never enough; a region answering 1 probe in 3 goes out); back after RISE successes in a row.
DEFAULT_THRESHOLD = 2
DEFAULT_WINDOW = 3
MAX_WINDOW = 32
DEFAULT_RISE = 3
DEFAULT_SUSPECT_TTL_S = 1
DEFAULT_CHECK_PATH = "/_latitude/health"
DEFAULT_HISTORY_PATH = ".latitude/routing-history.sqlite3"
SERVICES = ("app", "mirror")

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)


class RoutingConfigError(Exception):
    """The `[routing]` table cannot be used; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True)
class CidrEntry:
    """One row of the CIDR table: a network and either a region name or a location."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    region: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    label: str = ""


@dataclass(frozen=True)
class RoutingConfig:
    zone: str = DEFAULT_ZONE
    name: str = "app." + DEFAULT_ZONE
    ttl_s: int = DEFAULT_TTL_S
    check_interval_s: float = DEFAULT_INTERVAL_S
    check_timeout_s: float = 1.0
    check_threshold: int = DEFAULT_THRESHOLD
    check_window: int | None = None  # None: max(DEFAULT_WINDOW, check_threshold)
    check_rise: int | None = None  # None: max(DEFAULT_RISE, check_threshold)
    # While a verdict is in doubt (a recent failure, or down) probes come this often.
    check_suspect_interval_s: float | None = None  # None: a quarter of check_interval_s
    suspect_ttl_s: int = DEFAULT_SUSPECT_TTL_S  # TTL of answers naming a region in doubt
    check_quorum: int | None = None  # None: a majority of the vantage points
    check_path: str = DEFAULT_CHECK_PATH
    check_services: tuple[str, ...] = ("app",)
    history_path: str = DEFAULT_HISTORY_PATH
    addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Names that always answer the current primary region (the website of architecture A, an
    # admin host): absolute. Empty means `primary.<name>`.
    primary_names: tuple[str, ...] = ()
    cidrs: tuple[CidrEntry, ...] = ()
    geoip_path: str | None = None

    @property
    def nameserver(self) -> str:
        return "ns1." + self.zone

    @property
    def primary_only(self) -> tuple[str, ...]:
        return self.primary_names or ("primary." + self.name,)

    @property
    def window(self) -> int:
        return self.check_window or max(DEFAULT_WINDOW, self.check_threshold)

    @property
    def rise(self) -> int:
        return self.check_rise or max(DEFAULT_RISE, self.check_threshold)

    @property
    def suspect_interval_s(self) -> float:
        return self.check_suspect_interval_s or self.check_interval_s / 4

    def detection_bound_s(self) -> float:
        """Worst case from a region's death to the DNS answer changing: the next probe (one
        interval away at most) fails, then threshold - 1 more at the suspect cadence, each of
        which may take the whole timeout (twice it after a lost probe: a new connection)."""
        return (
            self.check_interval_s
            + (self.check_threshold - 1) * max(self.suspect_interval_s, 2 * self.check_timeout_s)
            + self.check_timeout_s
        )

    def with_overrides(self, **values: object) -> RoutingConfig:
        from dataclasses import replace

        return replace(self, **{k: v for k, v in values.items() if v is not None})


def fqdn(name: str, zone: str) -> str:
    """`name` as an absolute, lower-case domain name: relative names are placed in `zone`."""
    name = name.strip().lower()
    if name.endswith("."):
        return name
    if name in ("", "@"):
        return zone
    if name.endswith(zone.rstrip(".")):
        return name + "."
    return f"{name}.{zone}"


def routing_config(topology: Topology) -> RoutingConfig:
    """Validate `topology.routing` (the raw `[routing]` table)."""
    raw = dict(topology.routing)
    problems: list[str] = []
    regions = {r.name for r in topology.regions}

    def problem(key: str, message: str) -> None:
        problems.append(f"routing.{key}: {message}")

    def number(key: str, default: float, minimum: float, integer: bool = False) -> float:
        value = raw.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or (integer and int(value) != value)
        ):
            kind = "a whole number" if integer else "a number"
            problem(key, f"must be {kind}, got {value!r}; e.g. {key} = {default!r}")
            return default
        if value < minimum:
            problem(key, f"must be at least {minimum:g}, got {value!r}")
            return default
        return int(value) if integer else float(value)

    zone = raw.get("zone", DEFAULT_ZONE)
    if not isinstance(zone, str) or not _valid_domain(zone):
        problem("zone", f'{zone!r} is not a domain name; write it like zone = "example.com"')
        zone = DEFAULT_ZONE
    zone = zone.lower().rstrip(".") + "."
    name = raw.get("name", topology.app_name)
    if not isinstance(name, str) or not _valid_domain(fqdn(name, zone)):
        problem("name", f'{name!r} is not a host name; write it like name = "www"')
        name = "app"
    name = fqdn(name, zone)
    if not (name == zone or name.endswith("." + zone)):
        problem("name", f"{name!r} is not inside the zone {zone!r}; name a host in the zone")

    ttl = number("ttl_s", DEFAULT_TTL_S, 0, integer=True)
    interval = number("check_interval_s", DEFAULT_INTERVAL_S, 0.05)
    timeout = number("check_timeout_s", min(1.0, interval * 0.8), 0.01)
    if "check_timeout_s" in raw and timeout > interval:
        problem(
            "check_timeout_s", f"{timeout:g} s is longer than check_interval_s ({interval:g} s)"
        )
    threshold = number("check_threshold", DEFAULT_THRESHOLD, 1, integer=True)
    if threshold > MAX_WINDOW:
        problem("check_threshold", f"must be at most {MAX_WINDOW}, got {threshold:g}")
        threshold = DEFAULT_THRESHOLD
    window = raw.get("check_window")
    if window is not None:
        window = number("check_window", DEFAULT_WINDOW, 1, integer=True)
        if window > MAX_WINDOW:
            problem("check_window", f"must be at most {MAX_WINDOW}, got {window:g}")
            window = DEFAULT_WINDOW
        if window < threshold:
            problem(
                "check_window",
                f"{window:g} results cannot hold check_threshold = {threshold:g} failures; "
                f"make it at least {threshold:g}",
            )
    rise = raw.get("check_rise")
    if rise is not None:
        rise = number("check_rise", DEFAULT_RISE, 1, integer=True)
    suspect = raw.get("check_suspect_interval_s")
    if suspect is not None:
        suspect = number("check_suspect_interval_s", interval / 4, 0.01)
        if suspect > interval:
            problem(
                "check_suspect_interval_s",
                f"{suspect:g} s is longer than check_interval_s ({interval:g} s)",
            )
    suspect_ttl = number("suspect_ttl_s", DEFAULT_SUSPECT_TTL_S, 0, integer=True)
    quorum = raw.get("check_quorum")
    if quorum is not None:
        quorum = number("check_quorum", 1, 1, integer=True)

    path = raw.get("check_path", DEFAULT_CHECK_PATH)
    if not isinstance(path, str) or not path.startswith("/"):
        problem("check_path", f'must be a path starting with "/", like "{DEFAULT_CHECK_PATH}"')
        path = DEFAULT_CHECK_PATH

    # A deployment that only mirrors (no region runs the app) checks its mirrors by default.
    runs_app = any("app" in r.services for r in topology.regions)
    services = raw.get("check_services", ["app"] if runs_app else ["mirror"])
    if (
        not isinstance(services, list)
        or not services
        or not all(isinstance(s, str) and s in SERVICES for s in services)
    ):
        problem("check_services", 'must be a list of "app" and/or "mirror", like ["app"]')
        services = ["app"]

    history = raw.get("history_path", DEFAULT_HISTORY_PATH)
    if not isinstance(history, str) or not history:
        problem("history_path", 'must be a file path, like ".latitude/routing-history.sqlite3"')
        history = DEFAULT_HISTORY_PATH

    geoip = raw.get("geoip_path")
    if geoip is not None and (not isinstance(geoip, str) or not geoip):
        problem("geoip_path", "must be the path of a GeoLite2-City .mmdb file the user supplies")
        geoip = None

    addresses = _addresses(raw.get("addresses"), regions, problem)
    for r in topology.regions:
        if r.name not in addresses:
            guessed = _address_of_url(r.public_url)
            if guessed:
                addresses[r.name] = (guessed,)
    cidrs = _cidrs(raw.get("cidrs", []), regions, problem)
    primary_names = _primary_names(raw.get("primary_names"), zone, name, regions, problem)

    if problems:
        raise RoutingConfigError(topology.source, problems)
    return RoutingConfig(
        zone=zone,
        name=name,
        ttl_s=int(ttl),
        check_interval_s=interval,
        check_timeout_s=timeout,
        check_threshold=int(threshold),
        check_window=None if window is None else int(window),
        check_rise=None if rise is None else int(rise),
        check_suspect_interval_s=None if suspect is None else float(suspect),
        suspect_ttl_s=min(int(suspect_ttl), int(ttl)),
        check_quorum=None if quorum is None else int(quorum),
        check_path=path,
        check_services=tuple(dict.fromkeys(services)),
        history_path=history,
        addresses=addresses,
        primary_names=primary_names,
        cidrs=cidrs,
        geoip_path=geoip,
    )


def _primary_names(raw: object, zone: str, name: str, regions: set[str], problem):
    """`primary_names = ["www", "admin.example.com."]`: relative to the zone, or absolute."""
    if raw is None:
        return ()
    example = 'primary_names = ["www", "admin"]'
    if not isinstance(raw, list) or not all(isinstance(x, str) and x.strip() for x in raw):
        problem("primary_names", f"must be a list of host names; write {example}")
        return ()
    taken = {name, *(f"{r}.{name}" for r in regions)}
    out = []
    for given in raw:
        full = fqdn(given, zone)
        if not _valid_domain(full) or not (full == zone or full.endswith("." + zone)):
            problem("primary_names", f"{given!r} is not a host name in the zone {zone!r}")
        elif full in taken:
            problem(
                "primary_names",
                f"{given!r} is already answered by region choice ({full}); choose another name",
            )
        else:
            out.append(full)
    return tuple(dict.fromkeys(out))


def _valid_domain(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _address_of_url(url: str | None) -> str | None:
    """The public URL's host when it is an IP address literal (no resolving here)."""
    if not url:
        return None
    host = urlsplit(url).hostname
    try:
        return str(ipaddress.ip_address(host or ""))
    except ValueError:
        return None


def _addresses(raw: object, regions: set[str], problem) -> dict[str, tuple[str, ...]]:
    """`addresses = { us-west = ["192.0.2.10", "2001:db8::10"] }`, or, as the lab can write
    it, `addresses = [["us-west", "192.0.2.10", "2001:db8::10"], ...]`."""
    example = 'addresses = { us-west = ["192.0.2.10", "2001:db8::10"] }'
    if raw is None:
        return {}
    if isinstance(raw, list) and all(isinstance(x, list) and x for x in raw):
        raw = {str(x[0]): x[1:] for x in raw}
    if not isinstance(raw, dict):
        problem("addresses", f"must be a table of region = [addresses]; write {example}")
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for region, ips in raw.items():
        if region not in regions:
            problem(f"addresses.{region}", f"unknown region; known: {', '.join(sorted(regions))}")
            continue
        if isinstance(ips, str):
            ips = [ips]
        good: list[str] = []
        for ip in ips if isinstance(ips, list) else [ips]:
            try:
                good.append(str(ipaddress.ip_address(ip)))
            except (ValueError, TypeError):
                problem(f"addresses.{region}", f"{ip!r} is not an IPv4 or IPv6 address")
        out[region] = tuple(good)
    return out


def _cidrs(raw: object, regions: set[str], problem) -> tuple[CidrEntry, ...]:
    """`cidrs = [["198.51.100.0/24", "eu-west"], ["203.0.113.0/24", 48.85, 2.35, "Paris"]]`."""
    if not isinstance(raw, list):
        problem("cidrs", 'must be a list like [["198.51.100.0/24", "eu-west"]]')
        return ()
    out: list[CidrEntry] = []
    for i, row in enumerate(raw, start=1):
        try:
            out.append(parse_cidr_row(row, regions))
        except ValueError as exc:
            problem(f"cidrs[{i}]", str(exc))
    return tuple(out)


def parse_cidr_row(row: object, regions: set[str]) -> CidrEntry:
    """One CIDR table row: [cidr, region] or [cidr, latitude, longitude, (label)]."""
    hint = 'write ["198.51.100.0/24", "eu-west"] or ["198.51.100.0/24", 53.35, -6.26, "Dublin"]'
    if not isinstance(row, list | tuple) or len(row) < 2:
        raise ValueError(f"{row!r} is not a row; {hint}")
    try:
        network = ipaddress.ip_network(str(row[0]), strict=False)
    except ValueError:
        raise ValueError(f"{row[0]!r} is not a network in CIDR notation; {hint}") from None
    if len(row) == 2:
        region = str(row[1])
        if region not in regions:
            raise ValueError(f"unknown region {region!r}; known: {', '.join(sorted(regions))}")
        return CidrEntry(network, region=region, label=region)
    try:
        lat, lon = float(row[1]), float(row[2])
    except (TypeError, ValueError):
        raise ValueError(f"latitude and longitude must be numbers; {hint}") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"location ({lat}, {lon}) is outside -90..90, -180..180")
    label = str(row[3]) if len(row) > 3 else ""
    return CidrEntry(network, latitude=lat, longitude=lon, label=label)


def load_cidr_file(path: str, regions: set[str]) -> tuple[CidrEntry, ...]:
    """A CIDR table file: one row a line, `CIDR REGION` or `CIDR LAT LON [LABEL]`, commas or
    blanks between fields, `#` comments."""
    rows: list[CidrEntry] = []
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = [x for x in re.split(r"[,\s]+", line) if x]
            if len(fields) > 4:
                fields = [*fields[:3], " ".join(fields[3:])]
            try:
                rows.append(parse_cidr_row(fields, regions))
            except ValueError as exc:
                problems.append(f"line {n}: {exc}")
    if problems:
        raise RoutingConfigError(path, problems)
    return tuple(rows)
