"""Latency-based routing: health checks from several vantage points with uptime history, the
choice of the nearest healthy region, an authoritative DNS front, an HTTP routing endpoint,
and exports of the same policy for Route 53 and PowerDNS.

Modules: `config` ([routing] table), `geo` (client location, distance), `health` (checker),
`history` (uptime in SQLite), `choice` (region choice), `dns` (DNS front), `http`
(`GET /_latitude/route`), `export` (Route 53 / PowerDNS), `service` (all of it in one loop),
`cli` (the commands).
"""

from latitude.routing.choice import Choice, RegionRouter
from latitude.routing.config import RoutingConfig, RoutingConfigError, routing_config
from latitude.routing.health import HealthChecker, HealthView, Peer, Vantage, vantage_from_topology
from latitude.routing.history import UptimeHistory
from latitude.routing.http import ROUTE_PATH, add_routes, make_app, route_handler
from latitude.routing.service import BackgroundRouting, RoutingService

__all__ = [
    "ROUTE_PATH",
    "BackgroundRouting",
    "Choice",
    "HealthChecker",
    "HealthView",
    "Peer",
    "RegionRouter",
    "RoutingConfig",
    "RoutingConfigError",
    "RoutingService",
    "UptimeHistory",
    "Vantage",
    "add_routes",
    "make_app",
    "route_handler",
    "routing_config",
    "vantage_from_topology",
]
