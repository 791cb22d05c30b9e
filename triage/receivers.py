"""Triage every study as its images arrive, and again when a radiologist's finding on
it changes (a radiologist's flag can make a study urgent); a deleted mask row takes its
PNG with it."""

from __future__ import annotations

import contextlib
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from precedent.tasks import enqueue
from studies.models import Finding, Instance
from studies.signals import instance_stored

from .models import SegmentationMask


@receiver(instance_stored, sender=Instance)
def triage_on_arrival(sender, instance: Instance, **kwargs) -> None:
    # By series, so that storing an image costs no query here; see triage_series.
    enqueue("triage.triage_series", series_id=instance.series_id)


@receiver(post_save, sender=Finding)
@receiver(post_delete, sender=Finding)
def triage_on_radiologist_finding(sender, instance: Finding, **kwargs) -> None:
    # Dataset ground truth never steers the worklist: it is what evaluation measures against.
    if instance.source != Finding.Source.RADIOLOGIST:
        return
    study_id = Instance.objects.filter(pk=instance.instance_id).values_list("series__study_id", flat=True).first()
    if study_id is not None:
        enqueue("triage.triage_study", study_id=study_id)


@receiver(post_delete, sender=SegmentationMask)
def remove_mask_file_after_delete(sender, instance: SegmentationMask, **kwargs) -> None:
    """Its image was deleted (the rows cascade): the mask PNG goes too, once that
    commits, and the image's folder of masks with its last one."""
    path = Path(settings.PRECEDENT_HOME) / instance.mask_path

    def remove() -> None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other masks of the image are still there
            path.parent.rmdir()

    transaction.on_commit(remove)
