"""The talk's first attempt, for the demo's `sql-over-the-ocean` layout: the calendar runs in a
region near the user with a replica of its own, and handles every request itself. Reads use
the local replica; every write's SQL goes across the ocean to the primary database, on a new
connection each time (run with CALENDAR_PRIMARY_POOL=none). No gateway, no forwarding.

    CALENDAR_PRIMARY_POOL=none LATITUDE_TOPOLOGY=... LATITUDE_REGION=eu-west \\
        uvicorn examples.calendar.naive:app
"""

from examples.calendar.app import app as calendar
from latitude.db import route_to_primary, route_to_replica

SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["method"] not in SAFE:
        with route_to_primary():
            await calendar(scope, receive, send)
    else:
        with route_to_replica():
            await calendar(scope, receive, send)
