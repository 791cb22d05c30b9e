"""Keep files in step with rows, whichever way a row goes (service, admin, cascade)."""

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import Signal, receiver

from .models import Instance

# Sent once a newly stored instance has committed (not for duplicates), with
# `instance`. Embedding and triage listen to it to process new images in the background.
instance_stored = Signal()


@receiver(post_delete, sender=Instance)
def remove_file_after_delete(sender, instance: Instance, **kwargs) -> None:
    from .services import dicom_store, render_cache

    relative, sha256 = instance.file_path, instance.sha256

    def remove() -> None:
        dicom_store().remove(relative)
        # Its previews too: a deleted patient's images must not live on as PNGs.
        render_cache().forget(sha256)

    # Only once the deletion has committed: a rolled-back delete keeps its files.
    transaction.on_commit(remove)
