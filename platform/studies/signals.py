"""Keep files in step with rows, whichever way a row goes (service, admin, cascade)."""

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from .models import Instance


@receiver(post_delete, sender=Instance)
def remove_file_after_delete(sender, instance: Instance, **kwargs) -> None:
    from .services import dicom_store

    relative = instance.file_path
    # Only once the deletion has committed: a rolled-back delete keeps its file.
    transaction.on_commit(lambda: dicom_store().remove(relative))
