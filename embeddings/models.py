"""Encoder versions, embeddings (the source of truth for the FAISS index), feedback.

Vectors live in PostgreSQL as float32 bytes; the FAISS index under PRECEDENT_HOME is a
cache of them that can always be rebuilt. Every Embedding records the encoder version
that made it, so a new encoder can re-embed in the background while search keeps
serving the old version's index.
"""

from __future__ import annotations

import numpy as np
from django.conf import settings
from django.db import models
from django.db.models import Q

from studies.models import Finding, Instance


class EncoderVersion(models.Model):
    name = models.SlugField(max_length=100, unique=True, help_text="e.g. resnet18-d512-20261126-1")
    architecture = models.CharField(max_length=32)
    dim = models.PositiveIntegerField()
    input_size = models.PositiveIntegerField()
    weights_path = models.CharField(max_length=255, help_text="Relative to PRECEDENT_HOME")
    weights_sha256 = models.CharField(max_length=64)
    metadata = models.JSONField(default=dict, blank=True, help_text="training cohort, date, settings, metrics")

    class Status(models.TextChoices):
        READY = "ready", "trained, not serving"
        ACTIVATING = "activating", "embedding the archive before it serves"
        ACTIVE = "active", "serving search"
        RETIRED = "retired", "replaced by a newer version"

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY)
    created_at = models.DateTimeField(auto_now_add=True)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["status"], condition=Q(status="active"), name="one_active_encoder"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"


class Embedding(models.Model):
    class Kind(models.TextChoices):
        IMAGE = "image", "whole image"
        REGION = "region", "region (lesion box)"

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="embeddings")
    encoder = models.ForeignKey(EncoderVersion, on_delete=models.CASCADE, related_name="embeddings")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    frame = models.PositiveIntegerField(default=1)
    # Region embeddings: the box in image pixels, and the finding it came from if any.
    finding = models.ForeignKey(Finding, null=True, blank=True, on_delete=models.CASCADE, related_name="embeddings")
    x0 = models.FloatField(null=True, blank=True)
    y0 = models.FloatField(null=True, blank=True)
    x1 = models.FloatField(null=True, blank=True)
    y1 = models.FloatField(null=True, blank=True)
    vector = models.BinaryField(help_text="float32, L2-normalised, `dim` values")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "encoder", "frame"], condition=Q(kind="image"), name="one_image_embedding"
            ),
            models.UniqueConstraint(
                fields=["finding", "encoder"], condition=Q(finding__isnull=False), name="one_finding_embedding"
            ),
        ]
        indexes = [models.Index(fields=["encoder", "kind", "id"], name="embedding_encoder_kind_idx")]

    def __str__(self) -> str:
        return f"{self.kind} {self.instance_id} ({self.encoder_id})"

    @property
    def box(self) -> list[float] | None:
        return None if self.x0 is None else [self.x0, self.y0, self.x1, self.y1]

    def as_array(self) -> np.ndarray:
        return np.frombuffer(bytes(self.vector), dtype=np.float32)


class SearchFeedback(models.Model):
    """A radiologist's "relevant / not relevant" on one search result."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    encoder = models.ForeignKey(EncoderVersion, null=True, on_delete=models.SET_NULL)
    query_instance = models.ForeignKey(Instance, null=True, on_delete=models.SET_NULL, related_name="+")
    query_box = models.JSONField(null=True, blank=True)
    result_instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="+")
    result_box = models.JSONField(null=True, blank=True)
    rank = models.PositiveIntegerField()
    score = models.FloatField()
    relevant = models.BooleanField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{'relevant' if self.relevant else 'not relevant'} #{self.rank}"


class EmbeddingTombstone(models.Model):
    """A deleted embedding, so that every process's in-memory index drops it too.

    Processes catch up by reading tombstones newer than the last one they saw; the
    rows are small and can be pruned once every index has been rebuilt.
    """

    embedding_id = models.BigIntegerField()
    # No database constraint: deleting an encoder deletes its embeddings first, and each
    # of those deletions records a tombstone pointing at the encoder about to go; the
    # encoder's post_delete receiver then removes its tombstones (receivers.py).
    encoder = models.ForeignKey(EncoderVersion, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    kind = models.CharField(max_length=8, choices=Embedding.Kind.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["encoder", "kind", "id"], name="tombstone_encoder_kind_idx")]
