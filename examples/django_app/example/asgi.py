"""The Django example as an ASGI app, to run behind the region gateway:

latitude serve --region eu-west example.asgi:application --app-dir examples/django_app
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")
application = get_asgi_application()
