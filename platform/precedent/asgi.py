"""ASGI entry point."""

import os

from precedent.paths import add_import_roots

add_import_roots()
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "precedent.settings.production")

from django.core.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()

# A serving process embeds new images and answers searches: load torch now, at start,
# not in its first search (commands load it only when they embed or train).
import embeddings.encoder  # noqa: E402, F401
