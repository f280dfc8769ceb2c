"""HTTP routing for clients that cannot use DNS, as an aiohttp app others can mount.

`GET /_latitude/route` answers the nearest healthy region as JSON:

    {"region": "eu-west", "url": "https://eu-west.example.com", "addresses": [...],
     "fail_open": false, "basis": "measured-rtt", "reason": "...", "ttl_s": 30, ...}

Query parameters (all optional): `ip=ADDRESS` (default: the connecting address), or
`lat=..&lon=..` for a client that knows where it is; `redirect=1` answers `307` to the
region's URL (plus the request's `path=`) instead of JSON.

`GET /_latitude/routing/status` shows what the checker believes; `GET
/_latitude/routing/observations` is what peers read to use this checker as a vantage point.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable

from aiohttp import web

from latitude.routing.choice import RegionRouter
from latitude.routing.geo import Location

ROUTE_PATH = "/_latitude/route"
STATUS_PATH = "/_latitude/routing/status"
OBSERVATIONS_PATH = "/_latitude/routing/observations"


def route_handler(router: RegionRouter) -> Callable:
    async def handle(request: web.Request) -> web.StreamResponse:
        q = request.query
        client = {"ip": request.remote, "from": "connection"}
        try:
            if "lat" in q or "lon" in q:
                lat, lon = float(q["lat"]), float(q["lon"])
                if (
                    not (math.isfinite(lat) and math.isfinite(lon))
                    or abs(lat) > 90
                    or abs(lon) > 180
                ):
                    raise ValueError("lat must be in -90..90 and lon in -180..180")
                client = {"ip": None, "from": "query location"}
                choice = router.choose(Location(lat, lon, "query"))
            else:
                ip = q.get("ip") or request.remote or ""
                if "ip" in q:
                    ipaddress.ip_address(ip)
                    client = {"ip": ip, "from": "query"}
                choice = router.choose_for_address(ip)
        except (KeyError, ValueError) as exc:
            return web.json_response(
                {
                    "error": f"bad query: {exc}; use ?ip=ADDRESS or ?lat=DEG&lon=DEG",
                },
                status=400,
            )
        headers = {"Cache-Control": f"private, max-age={router.config.ttl_s}"}
        if q.get("redirect") in ("1", "true", "yes") and choice.url:
            path = q.get("path", "/")
            if not path.startswith("/") or path.startswith("//"):
                path = "/"
            raise web.HTTPTemporaryRedirect(choice.url.rstrip("/") + path, headers=headers)
        body = {**choice.as_dict(), "ttl_s": router.config.ttl_s, "client": client}
        return web.json_response(body, headers=headers)

    return handle


def add_routes(app: web.Application, router: RegionRouter, checker=None) -> None:
    """Mount the routing endpoints on an existing aiohttp app."""
    app.router.add_get(ROUTE_PATH, route_handler(router))

    async def status(_request: web.Request) -> web.Response:
        view = router.view()
        return web.json_response(
            {
                **view.as_dict(),
                "zone": router.config.zone,
                "name": router.config.name,
                "ttl_s": router.config.ttl_s,
                "check_interval_s": router.config.check_interval_s,
                "check_threshold": router.config.check_threshold,
            },
            headers={"Cache-Control": "no-store"},
        )

    app.router.add_get(STATUS_PATH, status)
    if checker is not None:

        async def observations(_request: web.Request) -> web.Response:
            return web.json_response(checker.observations(), headers={"Cache-Control": "no-store"})

        app.router.add_get(OBSERVATIONS_PATH, observations)


def make_app(router: RegionRouter, checker=None) -> web.Application:
    app = web.Application()
    add_routes(app, router, checker)
    return app
