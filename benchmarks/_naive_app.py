"""The naive multi-region layout, for `bench_gateway.py`: the calendar runs in a replica region
and handles every request itself, reads and writes alike, with all of its SQL sent to the
primary database across the ocean (the region's `primary_database_url`). No gateway, no
forwarding: what a replica region costs without Latitude.

    LATITUDE_TOPOLOGY=... LATITUDE_REGION=eu-west uvicorn benchmarks._naive_app:app --app-dir .
"""

from examples.calendar.app import app as calendar
from latitude.db import route_to_primary


async def app(scope, receive, send):
    with route_to_primary():
        await calendar(scope, receive, send)
