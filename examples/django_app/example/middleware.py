"""Stand-in for the Latitude gateway when the example runs alone (`manage.py runserver`).

Behind the gateway, the gateway has already decided the route of each request (and set
`current_request`): this middleware then changes nothing. Alone, it routes like the gateway
does at a replica region: safe methods read the local replica, everything else the primary.
"""

from latitude.db import (
    current_request,
    request_context,
    route_to_primary,
    route_to_replica,
)

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def route_by_method(get_response):
    def middleware(request):
        if current_request.get() is not None:  # the gateway decided
            return get_response(request)
        route = route_to_replica if request.method in SAFE_METHODS else route_to_primary
        with request_context(request.method, request.path), route():
            return get_response(request)

    return middleware
