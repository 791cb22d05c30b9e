"""WSGI entry point, e.g. `gunicorn --chdir platform precedent.wsgi`."""

import os

from precedent.paths import add_import_roots

add_import_roots()
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "precedent.settings.production")

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
