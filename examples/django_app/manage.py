#!/usr/bin/env python
"""The Django example's manage.py: `python manage.py migrate`, `python manage.py runserver`.

It needs the region's topology: LATITUDE_TOPOLOGY (a latitude.toml with database URLs) and
LATITUDE_REGION (which region this process runs in). See docs/db.md.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
