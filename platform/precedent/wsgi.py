"""WSGI entry point, e.g. `gunicorn --chdir platform precedent.wsgi`."""

import os

from precedent.paths import add_import_roots

add_import_roots()
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "precedent.settings.production")

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()

# A serving process embeds new images and answers searches: load torch now, at start,
# not in its first search (commands load it only when they embed or train), and the
# active encoder's indexes in the background (at 1M vectors a check against
# PostgreSQL takes seconds, a rebuild minutes).
import embeddings.encoder  # noqa: E402, F401
from embeddings.services import warm_indexes_in_background  # noqa: E402

warm_indexes_in_background()
