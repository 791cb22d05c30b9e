"""pytest-django: like dev, with a fast password hasher."""

from .dev import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
PRECEDENT_FSYNC = False
# Background jobs run in the test, once its transaction commits (never in a stray thread).
PRECEDENT_WORKER = "inline"
# Indexes check PostgreSQL for other processes' changes on every search.
PRECEDENT_INDEX_SYNC_SECONDS = 0.0
