import logging

from django.apps import AppConfig


class StudiesConfig(AppConfig):
    name = "studies"
    verbose_name = "Studies"

    def ready(self) -> None:
        from . import signals  # noqa: F401
        from .services import dicom_store

        # A process killed mid-upload leaves its spool behind: the next start removes
        # what has been untouched for a day (storage.STALE_SPOOL_SECONDS).
        removed = dicom_store().sweep()
        if removed:
            logging.getLogger(__name__).info("removed %d stale temp file(s) left by interrupted uploads", removed)
