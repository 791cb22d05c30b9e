"""Keep embeddings in step with the archive: new instances and boxes are embedded in
the background; deleted embeddings leave a tombstone for every process's index."""

from __future__ import annotations

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from precedent.tasks import enqueue
from studies.models import Finding, Instance
from studies.signals import instance_stored

from .models import Embedding


@receiver(instance_stored, sender=Instance)
def embed_new_instance(sender, instance: Instance, **kwargs) -> None:
    if instance.is_image:
        enqueue("embeddings.embed_instances", instance_ids=[instance.pk])


@receiver(post_save, sender=Finding)
def embed_finding_box(sender, instance: Finding, **kwargs) -> None:
    if instance.box is not None:
        enqueue("embeddings.embed_findings", finding_ids=[instance.pk])


@receiver(post_delete, sender=Embedding)
def tombstone(sender, instance: Embedding, **kwargs) -> None:
    from .services import record_tombstones

    record_tombstones([instance])
