from django.apps import AppConfig


class DimseConfig(AppConfig):
    """DICOM networking (DIMSE): the C-STORE listener, over the same ingest service."""

    name = "dimse"
    verbose_name = "DICOM networking"
