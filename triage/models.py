"""Triage rows: model versions, per-image quality, per-study results, operating points,
read marks and the audit trail.

History is kept in TriageResult itself: every re-triage that changes the outcome adds
a row and clears `is_current` on the previous one (a partial unique constraint keeps
one current row per study), so "what did the worklist say about this study on
Tuesday, and which model said it" is one query, and the worklist joins one row per
study. Rows are written by services.py only.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from studies.models import Cohort, Instance, Study


class TriageModelVersion(models.Model):
    """A trained classifier, detector or segmenter; one active per kind (as encoders)."""

    class Kind(models.TextChoices):
        CLASSIFIER = "classifier"
        DETECTOR = "detector"
        SEGMENTER = "segmenter"

    class Status(models.TextChoices):
        READY = "ready", "trained, not in use"
        ACTIVE = "active", "scoring new studies"
        RETIRED = "retired", "replaced by a newer version"

    name = models.SlugField(max_length=100, unique=True, help_text="e.g. mg-classifier-resnet18-20261201-1")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    architecture = models.CharField(max_length=64)
    weights_path = models.CharField(max_length=255, help_text="Relative to PRECEDENT_HOME (under models/)")
    sha256 = models.CharField(max_length=64)
    metadata = models.JSONField(
        default=dict, blank=True, help_text="task, preprocessing, training cohort, settings, metrics"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY)
    created_at = models.DateTimeField(auto_now_add=True)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["kind"], condition=Q(status="active"), name="one_active_triage_model"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}, {self.status})"


class ImageQuality(models.Model):
    """The quality check's verdict on one image, made once (instances never change)
    so re-triaging a study as its images arrive decodes each image only once."""

    instance = models.OneToOneField(Instance, on_delete=models.CASCADE, related_name="triage_quality")
    assessable = models.BooleanField()
    task = models.CharField(max_length=32, blank=True, help_text="the triage task the image fits, e.g. mammography")
    reasons = models.JSONField(default=list, blank=True)
    metrics = models.JSONField(default=dict, blank=True, help_text="spread and clipped shares of the pixel rules")
    checked_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "image quality"

    def __str__(self) -> str:
        return f"{'assessable' if self.assessable else 'not assessable'} {self.instance_id}"


class Category(models.TextChoices):
    URGENT = "urgent", "Urgent"
    SUSPICIOUS = "suspicious", "Suspicious"
    ROUTINE = "routine", "Routine"
    LIKELY_NEGATIVE = "likely_negative", "Likely negative"
    NOT_ASSESSABLE = "not_assessable", "Not assessable"
    PENDING = "pending", "Awaiting triage"


class OperatingPoint(models.Model):
    """A threshold on the classifier's score, with the validation run behind it.

    The newest signed-off point is the one triage uses. A point cannot be signed off
    without a validation cohort and computation (a database constraint, so neither
    the admin nor a script can skip it)."""

    model_versions = models.ManyToManyField(TriageModelVersion, related_name="operating_points")
    threshold = models.FloatField(help_text="P(abnormal) below this is likely negative")
    sensitivity = models.FloatField(help_text="on the validation cohort, at this threshold")
    specificity = models.FloatField()
    workload_reduction = models.FloatField(help_text="share of the validation exams ruled out")
    validation_cohort = models.ForeignKey(Cohort, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    validation = models.JSONField(default=dict, blank=True, help_text="ROC and workload curves, counts")
    computed_at = models.DateTimeField(null=True, blank=True)
    signed_off_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    signed_off_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(signed_off_at__isnull=True, signed_off_by__isnull=True)
                | Q(
                    signed_off_at__isnull=False,
                    signed_off_by__isnull=False,
                    validation_cohort__isnull=False,
                    computed_at__isnull=False,
                ),
                name="operating_point_signed_off_after_validation",
            ),
        ]

    def __str__(self) -> str:
        state = f"signed off {self.signed_off_at:%Y-%m-%d}" if self.signed_off_at else "not signed off"
        return f"threshold {self.threshold:g}, sensitivity {self.sensitivity:.3f} ({state})"


class TriageResult(models.Model):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="triage_results")
    is_current = models.BooleanField(default=True)
    category = models.CharField(max_length=16, choices=Category.choices)
    scores = models.JSONField(default=dict, blank=True, help_text="e.g. p_abnormal, p_malignant per image/breast/exam")
    reasons = models.JSONField(default=list, blank=True, help_text="human-readable, most important first")
    qa_read = models.BooleanField(default=False, help_text="a likely-negative study picked to be read anyway (QA)")
    model_versions = models.ManyToManyField(TriageModelVersion, blank=True, related_name="results")
    operating_point = models.ForeignKey(
        OperatingPoint, null=True, blank=True, on_delete=models.PROTECT, related_name="results"
    )
    overridden_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="set when a radiologist chose the category by hand",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # Also the index the worklist joins through (study_id, WHERE is_current).
            models.UniqueConstraint(fields=["study"], condition=Q(is_current=True), name="one_current_triage_result"),
        ]

    def __str__(self) -> str:
        return f"{self.category} ({'current' if self.is_current else 'history'})"

    @property
    def is_manual(self) -> bool:
        return self.overridden_by_id is not None


class StudyRead(models.Model):
    """A study someone has read. One per study, not per user: the worklist is shared
    by the reading group, and a study one radiologist has read must leave everyone's
    list, or two people read it (the QA double read is flagged separately)."""

    study = models.OneToOneField(Study, on_delete=models.CASCADE, related_name="read_mark")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    read_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.study_id} read {self.read_at:%Y-%m-%d %H:%M}"


class TriageAudit(models.Model):
    """Append-only: who changed what (manual category overrides, operating points)."""

    class Action(models.TextChoices):
        OVERRIDE = "override", "category set by hand"
        OPERATING_POINT = "operating_point", "operating point changed"

    action = models.CharField(max_length=32, choices=Action.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    study = models.ForeignKey(Study, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    operating_point = models.ForeignKey(
        OperatingPoint, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.action} by {self.user_id} at {self.created_at:%Y-%m-%d %H:%M}"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            raise ValueError("audit entries are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("audit entries are append-only")
