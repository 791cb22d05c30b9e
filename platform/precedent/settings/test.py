"""pytest-django: like dev, with a fast password hasher."""

from .dev import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
PRECEDENT_FSYNC = False
