"""Settings of the Django example: two databases from the topology, and Latitude's router.

"default" is the primary database (across the ocean at a replica region), "replica" the local
one; `latitude.db.LatitudeRouter` sends reads to "replica" when the gateway routed the request
to the replica, everything else to "default".
"""

import os

from latitude.db import django_databases
from latitude.topology import load_topology

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = ["events"]
MIDDLEWARE = ["example.middleware.route_by_method"]
ROOT_URLCONF = "example.urls"

TOPOLOGY = load_topology(os.environ.get("LATITUDE_TOPOLOGY", "latitude.toml"))
REGION = os.environ.get("LATITUDE_REGION") or TOPOLOGY.primary.name
DATABASES = django_databases(TOPOLOGY, REGION)
DATABASE_ROUTERS = ["latitude.db.LatitudeRouter"]

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
