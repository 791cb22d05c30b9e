"""Which stored DICOM SR/SEG instance holds which model's results for which image."""

from __future__ import annotations

from django.db import models

from studies.models import Instance
from triage.models import TriageModelVersion


class AiDicomResult(models.Model):
    """One stored SR (detections) or SEG (masks) made from one model version's output
    on one source image: the key that keeps generation idempotent and lets the viewer
    link to the files."""

    class Kind(models.TextChoices):
        SR = "sr", "DICOM SR measurement report (detections)"
        SEG = "seg", "DICOM Segmentation (masks)"

    source = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="ai_dicom_results")
    model_version = models.ForeignKey(TriageModelVersion, on_delete=models.PROTECT, related_name="dicom_results")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    instance = models.ForeignKey(
        Instance, on_delete=models.CASCADE, related_name="+", help_text="The stored SR or SEG instance"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["kind", "id"]
        constraints = [
            models.UniqueConstraint(fields=["source", "model_version", "kind"], name="one_ai_dicom_per_source_version")
        ]

    def __str__(self) -> str:
        return f"{self.kind} of {self.source_id} by {self.model_version_id}"
