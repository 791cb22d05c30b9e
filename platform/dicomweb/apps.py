from django.apps import AppConfig


class DicomwebConfig(AppConfig):
    """DICOMweb (STOW-RS, QIDO-RS, WADO-RS) under /dicomweb/, over the same services."""

    name = "dicomweb"
    verbose_name = "DICOMweb"
