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
    """A threshold on an exam score, with the validation run behind it.

    `score_source` says which score (triage/exam_score.py: the classifier's
    P(abnormal), the detector's best box, or both fused) the threshold was
    calibrated on, and `model_versions` which versions made it; triage on arrival
    computes that same score with those same versions, or the point does not apply.
    The newest signed-off point whose versions are all active is the one triage uses.
    A point cannot be signed off without a validation cohort and computation (a
    database constraint, so neither the admin nor a script can skip it)."""

    class ScoreSource(models.TextChoices):
        CLASSIFIER = "classifier", "classifier P(abnormal)"
        DETECTOR = "detector", "detector score (best box)"
        FUSED = "fused", "classifier and detector, noisy-OR"

    model_versions = models.ManyToManyField(TriageModelVersion, related_name="operating_points")
    score_source = models.CharField(
        max_length=16,
        choices=ScoreSource.choices,
        default=ScoreSource.CLASSIFIER,
        help_text="the exam score the threshold applies to (triage/exam_score.py)",
    )
    threshold = models.FloatField(help_text="an exam score below this is likely negative")
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
            models.CheckConstraint(
                condition=Q(score_source__in=["classifier", "detector", "fused"]),
                name="operating_point_known_score_source",
            ),
        ]

    def __str__(self) -> str:
        state = f"signed off {self.signed_off_at:%Y-%m-%d}" if self.signed_off_at else "not signed off"
        return f"{self.score_source} threshold {self.threshold:g}, sensitivity {self.sensitivity:.3f} ({state})"


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
    # The study's images when this was last computed, or found unchanged (count, newest
    # id): an arrival job that finds the same pair has nothing new to triage.
    images_seen = models.PositiveIntegerField(null=True, blank=True)
    last_instance_id = models.BigIntegerField(null=True, blank=True)

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
    """Append-only: who changed what (manual category overrides, operating points, which
    model versions serve)."""

    class Action(models.TextChoices):
        OVERRIDE = "override", "category set by hand"
        OPERATING_POINT = "operating_point", "operating point changed"
        MODEL = "model", "triage model activated or retired"

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


class Detection(models.Model):
    """A box the active detector put on one image: model output, never ground truth
    (that is studies.Finding). One set per (instance, model version): re-triaging a
    study replaces that version's boxes instead of stacking duplicates."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="detections")
    model_version = models.ForeignKey(TriageModelVersion, on_delete=models.PROTECT, related_name="detections")
    label = models.CharField(max_length=64)
    score = models.FloatField()
    # Image pixels of the stored image, top-left origin, x1/y1 exclusive (as studies.Finding).
    x0 = models.FloatField()
    y0 = models.FloatField()
    x1 = models.FloatField()
    y1 = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-score", "id"]
        indexes = [models.Index(fields=["instance", "model_version"], name="triage_detection_inst_ver")]

    def __str__(self) -> str:
        return f"{self.label} {self.score:.2f} on {self.instance_id}"


class SegmentationMask(models.Model):
    """One label's mask from the active segmenter for one image: an 8-bit PNG under
    PRECEDENT_HOME with the image's rows x columns, 0 outside and 255 inside."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="segmentation_masks")
    model_version = models.ForeignKey(TriageModelVersion, on_delete=models.PROTECT, related_name="masks")
    label = models.CharField(max_length=64, help_text='e.g. "breast", "lesion"')
    mask_path = models.CharField(max_length=255, help_text="Relative to PRECEDENT_HOME (under masks/)")
    area_fraction = models.FloatField(default=0.0, help_text="share of the image's pixels inside the mask")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["label", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "model_version", "label"], name="one_mask_per_instance_version_label"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.label} mask on {self.instance_id}"


class LocalisationRun(models.Model):
    """That a detector or segmenter version has run on an image, with or without
    output: re-triaging a study as its images keep arriving then runs each model once
    per image instead of once per arrival (an image with no boxes leaves no Detection
    row to tell)."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="localisation_runs")
    model_version = models.ForeignKey(TriageModelVersion, on_delete=models.PROTECT, related_name="localisation_runs")
    outputs = models.PositiveIntegerField(default=0, help_text="boxes or masks stored")
    seconds = models.FloatField(default=0.0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["instance", "model_version"], name="one_localisation_run_per_version"),
        ]

    def __str__(self) -> str:
        return f"{self.model_version_id} on {self.instance_id}: {self.outputs} outputs"
