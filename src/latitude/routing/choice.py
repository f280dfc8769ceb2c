"""Choosing a region for a client: its location, then the healthy region closest in round trips.

1. The client's address (EDNS Client Subnet when the resolver sends one, else the resolver's own
   address) becomes a location through the CIDR table or the GeoIP database.
2. The vantage point nearest that location stands in for the client: the checkers there have
   measured the round trip to every region. The routable region (healthy; all of them when none
   is: fail-open) with the lowest measured RTT from it wins; the client's own region, when
   healthy, wins at once (its RTT is the local one).
3. Where nothing is measured (no checker has reached a region from there yet) the great-circle
   distance from the client to each region's `location` decides, converted to an estimated RTT.
4. A client without a known location gets the primary region when it is routable: the primary
   of the current epoch (`primary`, which follows promotions), not the topology file's.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass

from latitude.routing.config import RoutingConfig
from latitude.routing.geo import Location, Locator, Lookup, estimated_rtt_ms, great_circle_km
from latitude.routing.health import HealthView, empty_view
from latitude.topology import Topology


@dataclass(frozen=True)
class Choice:
    region: str
    addresses: tuple[str, ...]
    url: str | None
    fail_open: bool
    basis: str  # "measured-rtt", "distance" or "default"
    reason: str
    location: Location | None
    scope: int  # ECS scope prefix length this answer is valid for
    vantage: str | None
    estimated_rtt_ms: float | None
    healthy: tuple[str, ...]

    def as_dict(self) -> dict:
        return {
            "region": self.region,
            "url": self.url,
            "addresses": list(self.addresses),
            "fail_open": self.fail_open,
            "basis": self.basis,
            "reason": self.reason,
            "vantage": self.vantage,
            "estimated_rtt_ms": None
            if self.estimated_rtt_ms is None
            else round(self.estimated_rtt_ms, 1),
            "healthy": list(self.healthy),
            "location": self.location.as_dict() if self.location else None,
        }


class RegionRouter:
    def __init__(
        self,
        topology: Topology,
        config: RoutingConfig,
        locator: Locator | None = None,
        view: Callable[[], HealthView] | None = None,
        primary: Callable[[], str] | None = None,
    ):
        self.topology = topology
        self.config = config
        self.locator = locator or Locator()
        names = [r.name for r in topology.regions]
        fixed = empty_view(names)
        self._view = view or (lambda: fixed)
        self._regions = {r.name: r for r in topology.regions}
        start = topology.primary.name
        self.primary: Callable[[], str] = primary or (lambda: start)

    def primary_choice(self) -> Choice:
        """The current primary region, whatever its health: primary-only names have nowhere
        else to go (its gateway forwards nothing; a promotion moves them)."""
        view = self._view()
        return self._choice(
            self.primary(),
            view.fail_open,
            "primary",
            "a primary-only name: the current epoch's primary region",
            None,
            0,
            None,
            None,
            view.healthy,
        )

    def view(self) -> HealthView:
        return self._view()

    def lookup(self, address: str, source_prefix: int | None = None) -> Lookup:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return Lookup(None, 0)
        return self.locator.lookup(ip, source_prefix)

    def choose_for_address(self, address: str, source_prefix: int | None = None) -> Choice:
        found = self.lookup(address, source_prefix)
        return self.choose(found.location, found.scope)

    def choose(self, location: Location | None, scope: int = 0) -> Choice:
        view = self._view()
        candidates = [n for n in view.routable if n in self._regions] or list(self._regions)
        fail_open = view.fail_open
        healthy = view.healthy
        if location is None:
            primary = self.primary()
            if primary in candidates:
                return self._choice(
                    primary,
                    fail_open,
                    "default",
                    "no location for this client: the primary",
                    None,
                    scope,
                    None,
                    None,
                    healthy,
                )
            origin: tuple[float, float] = (
                self._regions[primary].latitude,
                self._regions[primary].longitude,
            )
            vantage = primary if any(v == primary for v, _ in view.rtt_ms) else None
            best, ms, basis = self._best(candidates, origin, vantage, view)
            return self._choice(
                best,
                fail_open,
                basis,
                f"no location for this client and the primary is down: {basis} from the primary",
                None,
                scope,
                vantage,
                ms,
                healthy,
            )
        origin = (location.latitude, location.longitude)
        vantage = location.region if location.region in view.vantage_locations else None
        if vantage is None and view.vantage_locations:
            vantage = min(
                view.vantage_locations,
                key=lambda v: great_circle_km(*origin, *view.vantage_locations[v]),
            )
        best, ms, basis = self._best(candidates, origin, vantage, view)
        if basis == "measured-rtt":
            reason = f"lowest RTT measured from {vantage}, the vantage point nearest the client"
        else:
            reason = "shortest great-circle distance (no RTT measured from near the client)"
        if fail_open:
            reason += "; every region looks down, so all are used (fail-open)"
        return self._choice(best, fail_open, basis, reason, location, scope, vantage, ms, healthy)

    def _best(
        self,
        candidates: list[str],
        origin: tuple[float, float],
        vantage: str | None,
        view: HealthView,
    ) -> tuple[str, float, str]:
        measured = {}
        if vantage is not None:
            measured = {
                c: view.rtt_ms[(vantage, c)] for c in candidates if (vantage, c) in view.rtt_ms
            }
        if measured:
            vloc = view.vantage_locations.get(vantage) if vantage else None
            to_vantage = estimated_rtt_ms(great_circle_km(*origin, *vloc)) if vloc else 0.0

            def score(c: str) -> float:
                if c in measured:
                    return measured[c]
                # Unmeasured from there: guess from the distance between vantage and region.
                r = self._regions[c]
                base = vloc or origin
                return estimated_rtt_ms(great_circle_km(*base, r.latitude, r.longitude))

            best = min(candidates, key=score)
            return best, to_vantage + score(best), "measured-rtt"

        def distance(c: str) -> float:
            r = self._regions[c]
            return great_circle_km(*origin, r.latitude, r.longitude)

        best = min(candidates, key=distance)
        return best, estimated_rtt_ms(distance(best)), "distance"

    def _choice(
        self,
        region: str,
        fail_open: bool,
        basis: str,
        reason: str,
        location: Location | None,
        scope: int,
        vantage: str | None,
        ms: float | None,
        healthy: tuple[str, ...],
    ) -> Choice:
        r = self._regions[region]
        return Choice(
            region=region,
            addresses=tuple(self.config.addresses.get(region, ())),
            url=r.public_url,
            fail_open=fail_open,
            basis=basis,
            reason=reason,
            location=location,
            scope=scope,
            vantage=vantage,
            estimated_rtt_ms=None if ms is None or math.isnan(ms) else ms,
            healthy=healthy,
        )
