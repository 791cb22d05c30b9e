from django.apps import AppConfig


class TriageConfig(AppConfig):
    """Worklist triage: classifier, detector, segmenter, calibration."""

    name = "triage"
    verbose_name = "Triage"

    def ready(self) -> None:
        # Registers the signal receivers, the background job and the settings check.
        from . import checks, receivers, services  # noqa: F401
