from django.apps import AppConfig


class AccessConfig(AppConfig):
    """Roles, the access policy (platform/access/policy.py) and the append-only audit log."""

    name = "access"
    verbose_name = "Access and audit"

    def ready(self) -> None:
        from . import receivers  # noqa: F401
