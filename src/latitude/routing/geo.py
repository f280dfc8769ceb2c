"""Where a client is: an address to a location, through a CIDR table or a GeoLite2-format
database the user supplies; and how far apart two places are (great-circle distance).

A lookup also says how many leading bits of the address decided the answer: that is the
`SCOPE PREFIX-LENGTH` an authoritative server echoes for EDNS Client Subnet (RFC 7871), so a
resolver caches the answer for exactly the block of addresses it is right for.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from latitude.routing.config import CidrEntry
from latitude.topology import Topology

EARTH_RADIUS_KM = 6371.0
# Light in fibre covers about 200 km per millisecond; real paths are longer than great
# circles, so a round trip costs about 2 x distance / 200 km/ms x 1.5.
FIBRE_KM_PER_MS = 200.0
PATH_STRETCH = 1.5

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Location:
    latitude: float
    longitude: float
    source: str  # "cidr", "geoip", "region" or "query"
    label: str = ""
    region: str | None = None  # set when the CIDR table names a region outright

    def as_dict(self) -> dict:
        return {
            "latitude": self.latitude,
            "longitude": self.longitude,
            "source": self.source,
            "label": self.label,
            "region": self.region,
        }


@dataclass(frozen=True)
class Lookup:
    location: Location | None
    scope: int  # leading bits of the address that decided this answer


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def estimated_rtt_ms(distance_km: float) -> float:
    """A round-trip time guessed from distance alone, for when nothing has been measured."""
    return 2 * distance_km / FIBRE_KM_PER_MS * PATH_STRETCH


def truncate(address: IPAddress, prefix: int) -> IPAddress:
    """The address with every bit past `prefix` cleared."""
    bits = address.max_prefixlen
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)
    cls = ipaddress.IPv4Address if bits == 32 else ipaddress.IPv6Address
    return cls(int(address) & mask)


def _common_prefix(a: int, b: int, bits: int) -> int:
    return bits - (a ^ b).bit_length()


class CidrTable:
    """A small table of networks; the longest prefix containing the address wins."""

    def __init__(self, entries: tuple[CidrEntry, ...] | list[CidrEntry], topology: Topology):
        self.entries = list(entries)
        self._regions = {r.name: r for r in topology.regions}

    def _location(self, entry: CidrEntry) -> Location:
        if entry.region is not None:
            r = self._regions[entry.region]
            return Location(r.latitude, r.longitude, "cidr", entry.label, entry.region)
        assert entry.latitude is not None and entry.longitude is not None
        return Location(entry.latitude, entry.longitude, "cidr", entry.label)

    def lookup(self, address: IPAddress, source_prefix: int | None = None) -> Lookup:
        bits = address.max_prefixlen
        s = bits if source_prefix is None else source_prefix
        addr = int(truncate(address, s))
        same_family = [e for e in self.entries if e.network.version == address.version]
        best: CidrEntry | None = None
        for e in same_family:
            n = e.network
            if (
                n.prefixlen <= s
                and _common_prefix(addr, int(n.network_address), bits) >= n.prefixlen
            ):
                if best is None or n.prefixlen > best.network.prefixlen:
                    best = e
        scope = best.network.prefixlen if best else 0
        # Widen the scope past every more specific network that shares our block, so the answer
        # is only cached for addresses it is right for (longer than the source: ask for more bits).
        for e in same_family:
            n = e.network
            if e is best or (best is not None and n.prefixlen <= best.network.prefixlen):
                continue
            common = _common_prefix(addr, int(n.network_address), bits)
            # One bit past the common prefix tells this network apart. When that is past the
            # source prefix, the answer depends on bits the resolver did not send (scope longer
            # than source); like a MaxMind tree walk, it then names the block around the
            # zero-filled address.
            needed = n.prefixlen if common >= n.prefixlen else common + 1
            scope = max(scope, needed)
        return Lookup(self._location(best) if best else None, min(scope, bits))


class GeoIPDatabase:
    """A GeoLite2-City (or any MaxMind DB with `location`) file the user supplies."""

    def __init__(self, path: str):
        try:
            import maxminddb
        except ImportError:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                "reading a GeoLite2 database needs the maxminddb package: pip install maxminddb"
            ) from None
        self.path = path
        self.reader = maxminddb.open_database(path)

    def close(self) -> None:
        self.reader.close()

    def lookup(self, address: IPAddress, source_prefix: int | None = None) -> Lookup:
        bits = address.max_prefixlen
        s = bits if source_prefix is None else source_prefix
        try:
            record, prefix = self.reader.get_with_prefix_len(truncate(address, s))
        except ValueError:  # e.g. an IPv6 address in an IPv4-only database
            return Lookup(None, 0)
        location = None
        if isinstance(record, dict):
            loc = record.get("location")
            if isinstance(loc, dict) and "latitude" in loc and "longitude" in loc:
                label = ""
                city = (
                    record.get("city", {}).get("names", {}).get("en")
                    if isinstance(record.get("city"), dict)
                    else None
                )
                country = (
                    record.get("country", {}).get("iso_code")
                    if isinstance(record.get("country"), dict)
                    else None
                )
                label = ", ".join(x for x in (city, country) if x)
                location = Location(float(loc["latitude"]), float(loc["longitude"]), "geoip", label)
        return Lookup(location, min(int(prefix), bits))


class Locator:
    """The CIDR table first (the operator's own knowledge), then the GeoIP database."""

    def __init__(self, cidr: CidrTable | None = None, geoip: GeoIPDatabase | None = None):
        self.cidr = cidr
        self.geoip = geoip

    def lookup(self, address: IPAddress | str, source_prefix: int | None = None) -> Lookup:
        if isinstance(address, str):
            address = ipaddress.ip_address(address)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
            if source_prefix is not None:
                source_prefix = max(0, source_prefix - 96)
        scope = 0
        for source in (self.cidr, self.geoip):
            if source is None:
                continue
            found = source.lookup(address, source_prefix)
            scope = max(scope, found.scope)
            if found.location is not None:
                return Lookup(found.location, scope)
        return Lookup(None, scope)

    def close(self) -> None:
        if self.geoip:
            self.geoip.close()
