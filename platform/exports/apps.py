from django.apps import AppConfig


class ExportsConfig(AppConfig):
    """De-identified research exports, and AI results as DICOM SR and SEG."""

    name = "exports"
    label = "exports"
    verbose_name = "Exports"
