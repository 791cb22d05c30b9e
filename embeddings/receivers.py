"""Keep embeddings in step with the archive: new instances and boxes are embedded in
the background; deleted embeddings leave a tombstone for every process's index; a
cleared box takes its region embedding with it; a deleted encoder takes its
embeddings, tombstones, weights file and saved indexes."""

from __future__ import annotations

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from precedent.tasks import enqueue
from studies.models import Finding, Instance
from studies.signals import instance_stored

from .models import Embedding, EmbeddingTombstone, EncoderVersion


@receiver(instance_stored, sender=Instance)
def embed_new_instance(sender, instance: Instance, **kwargs) -> None:
    if instance.is_image:
        enqueue("embeddings.embed_instances", instance_ids=[instance.pk])


@receiver(post_save, sender=Finding)
def embed_finding_box(sender, instance: Finding, created: bool = False, **kwargs) -> None:
    if instance.box is not None:
        enqueue("embeddings.embed_findings", finding_ids=[instance.pk])
    elif not created:  # the box was cleared: its lesion leaves the region index
        Embedding.objects.filter(finding=instance).delete()


@receiver(post_delete, sender=Embedding)
def tombstone(sender, instance: Embedding, **kwargs) -> None:
    from .services import record_tombstones

    record_tombstones([instance])


@receiver(post_delete, sender=EncoderVersion)
def encoder_deleted(sender, instance: EncoderVersion, **kwargs) -> None:
    from .services import encoder_files_remove

    # Its embeddings went first in the same deletion, each leaving a tombstone: no index
    # of this encoder will be served again, so they go too.
    EmbeddingTombstone.objects.filter(encoder_id=instance.pk).delete()
    transaction.on_commit(lambda: encoder_files_remove(instance))
