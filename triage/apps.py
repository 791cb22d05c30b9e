from django.apps import AppConfig


class TriageConfig(AppConfig):
    """Worklist triage: classifier, detector, segmenter, calibration."""

    name = "triage"
    verbose_name = "Triage"
