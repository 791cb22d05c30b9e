"""Patient → Study → Series → Instance, ground-truth Findings and Cohorts.

Rows mirror the DICOM information model; the bytes live on disk under
PRECEDENT_HOME, content-addressed by SHA-256 (see storage.py). Rows are written by
services.py only.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.db.models import Q
from django.urls import reverse

SYNTHETIC_PREFIX = "SYNTHETIC"


def format_person_name(raw: str) -> str:
    """DICOM PN 'Family^Given^Middle^Prefix^Suffix' → 'Family, Given Middle'."""
    alphabetic = raw.split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")]
    family = parts[0] if parts else ""
    given = " ".join(p for p in parts[1:3] if p)
    if family and given:
        return f"{family}, {given}"
    return family or given


class Patient(models.Model):
    patient_id = models.CharField(max_length=64, blank=True)
    issuer_of_patient_id = models.CharField(max_length=64, blank=True)
    name = models.CharField(max_length=320, blank=True, help_text="DICOM PN, e.g. 'Family^Given'")
    sex = models.CharField(max_length=16, blank=True)
    birth_date = models.DateField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # A PatientID names one patient within its issuer. An empty one (type 2: it
            # may be) names nobody: each study without one gets a patient of its own.
            models.UniqueConstraint(
                fields=["patient_id", "issuer_of_patient_id"], condition=~Q(patient_id=""), name="patient_unique_id"
            ),
        ]
        indexes = [models.Index(fields=["name"], name="patient_name_idx")]

    def __str__(self) -> str:
        return f"{self.display_name} ({self.patient_id or 'no ID'})"

    @property
    def display_name(self) -> str:
        return format_person_name(self.name) or "(no name)"

    @property
    def is_synthetic(self) -> bool:
        """Generated phantoms carry SYNTHETIC in the patient name; the UI marks them."""
        return self.name.upper().startswith(SYNTHETIC_PREFIX)


class Study(models.Model):
    study_instance_uid = models.CharField(max_length=64, unique=True)
    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="studies")
    accession_number = models.CharField(max_length=64, blank=True)
    study_id = models.CharField(max_length=64, blank=True)
    study_date = models.DateField(null=True, blank=True)
    study_time = models.TimeField(null=True, blank=True)
    description = models.CharField(max_length=255, blank=True)
    referring_physician = models.CharField(max_length=320, blank=True)
    institution_name = models.CharField(max_length=255, blank=True)
    # The patient as this study's images name them. Patient rows group studies by ID;
    # names, sex and birth date can differ between studies under one ID (a married name,
    # a correction, several anonymous studies without an ID), and each study answers
    # with its own (DICOMweb, the study page).
    patient_name = models.CharField(max_length=320, blank=True)
    patient_sex = models.CharField(max_length=16, blank=True)
    patient_birth_date = models.DateField(null=True, blank=True)
    # Modalities of the study's series, kept here so list filters need no join.
    modalities = ArrayField(models.CharField(max_length=16), default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the first instance arrived")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "studies"
        indexes = [
            models.Index(fields=["-study_date", "-study_time"], name="study_date_idx"),
            models.Index(fields=["accession_number"], name="study_accession_idx"),
            models.Index(fields=["-created_at"], name="study_arrival_idx"),
            GinIndex(fields=["modalities"], name="study_modalities_gin"),
        ]

    def __str__(self) -> str:
        return f"{self.study_date or 'undated'} {self.description or self.study_instance_uid}"

    def get_absolute_url(self) -> str:
        return reverse("studies:detail", args=[self.study_instance_uid])

    @property
    def patient_display_name(self) -> str:
        return format_person_name(self.patient_name) or "(no name)"


class Series(models.Model):
    series_instance_uid = models.CharField(max_length=64, unique=True)
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    modality = models.CharField(max_length=16, blank=True)
    series_number = models.IntegerField(null=True, blank=True)
    description = models.CharField(max_length=255, blank=True)
    body_part = models.CharField(max_length=64, blank=True)
    manufacturer = models.CharField(max_length=255, blank=True)
    manufacturer_model = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "series"
        ordering = ["series_number", "id"]
        indexes = [models.Index(fields=["modality"], name="series_modality_idx")]

    def __str__(self) -> str:
        return f"{self.modality} #{self.series_number} {self.description}".strip()


# SOP classes that carry pixel data but are not pictures of the patient: a segmentation
# is a mask over another image, RT Dose a dose grid. Embedding or triaging them would
# put masks among the similar cases and score them as if they were images.
NOT_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
    }
)


class InstanceQuerySet(models.QuerySet):
    def images(self) -> InstanceQuerySet:
        """Instances whose pixels are an image of the patient (what search and triage read)."""
        return self.filter(has_pixel_data=True, rows__isnull=False).exclude(sop_class_uid__in=NOT_IMAGE_SOP_CLASSES)


class Instance(models.Model):
    sop_instance_uid = models.CharField(max_length=64, unique=True)
    sop_class_uid = models.CharField(max_length=64)
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="instances")
    instance_number = models.IntegerField(null=True, blank=True)
    laterality = models.CharField(max_length=16, blank=True, help_text="ImageLaterality, else Laterality")
    view_position = models.CharField(max_length=16, blank=True)
    rows = models.PositiveIntegerField(null=True, blank=True)
    columns = models.PositiveIntegerField(null=True, blank=True)
    number_of_frames = models.PositiveIntegerField(default=1)
    samples_per_pixel = models.PositiveSmallIntegerField(null=True, blank=True)
    bits_allocated = models.PositiveSmallIntegerField(null=True, blank=True)
    bits_stored = models.PositiveSmallIntegerField(null=True, blank=True)
    photometric_interpretation = models.CharField(max_length=32, blank=True)
    transfer_syntax_uid = models.CharField(max_length=64)
    has_pixel_data = models.BooleanField(default=False)
    file_path = models.CharField(max_length=255, help_text="Relative to PRECEDENT_HOME")
    sha256 = models.CharField(max_length=64, db_index=True, help_text="Of the stored file")
    dataset_sha256 = models.CharField(
        max_length=64, blank=True, help_text="Of the dataset after the File Meta: the same instance by any route"
    )
    size = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    objects = InstanceQuerySet.as_manager()

    class Meta:
        ordering = ["instance_number", "id"]

    def __str__(self) -> str:
        return self.sop_instance_uid

    @property
    def transfer_syntax_name(self) -> str:
        from pydicom.uid import UID

        return UID(self.transfer_syntax_uid).name

    @property
    def sop_class_name(self) -> str:
        from pydicom.uid import UID

        return UID(self.sop_class_uid).name

    @property
    def is_previewable(self) -> bool:
        return self.has_pixel_data and bool(self.rows) and bool(self.columns)

    @property
    def is_image(self) -> bool:
        """See InstanceQuerySet.images()."""
        return self.is_previewable and self.sop_class_uid not in NOT_IMAGE_SOP_CLASSES


class Finding(models.Model):
    """Ground truth for one image: normal, or a lesion with its class and box/mask."""

    class Pathology(models.TextChoices):
        NORMAL = "normal"
        BENIGN = "benign"
        MALIGNANT = "malignant"
        UNKNOWN = "unknown", "abnormal, pathology unknown"

    class Source(models.TextChoices):
        DATASET = "dataset"
        RADIOLOGIST = "radiologist"

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="findings")
    pathology = models.CharField(max_length=16, choices=Pathology.choices)
    abnormality_class = models.CharField(
        max_length=64, blank=True, help_text="e.g. CALC, CIRC, SPIC, mass, Nodule; blank for normal"
    )
    # Box in image pixels of the instance (top-left origin, x1/y1 exclusive).
    x0 = models.FloatField(null=True, blank=True)
    y0 = models.FloatField(null=True, blank=True)
    x1 = models.FloatField(null=True, blank=True)
    y1 = models.FloatField(null=True, blank=True)
    mask_path = models.CharField(max_length=255, blank=True, help_text="PNG under PRECEDENT_HOME, if any")
    source = models.CharField(max_length=16, choices=Source.choices)
    source_key = models.CharField(
        max_length=255, blank=True, help_text="Where it came from, e.g. 'mini-mias:mdb005:0'; re-imports update it"
    )
    attributes = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(x0__isnull=True, y0__isnull=True, x1__isnull=True, y1__isnull=True)
                | Q(x0__isnull=False, y0__isnull=False, x1__gt=models.F("x0"), y1__gt=models.F("y0")),
                name="finding_box_complete_and_positive",
            ),
            models.UniqueConstraint(
                fields=["instance", "source_key"], condition=~Q(source_key=""), name="finding_unique_source_key"
            ),
        ]
        indexes = [models.Index(fields=["pathology", "abnormality_class"], name="finding_class_idx")]

    def __str__(self) -> str:
        return f"{self.pathology} {self.abnormality_class}".strip()

    @property
    def box(self) -> list[float] | None:
        if self.x0 is None:
            return None
        return [self.x0, self.y0, self.x1, self.y1]


class Cohort(models.Model):
    """A named set of studies that train, calibrate and evaluate commands select."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    studies = models.ManyToManyField(Study, related_name="cohorts", through="CohortMembership")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class CohortMembership(models.Model):
    cohort = models.ForeignKey(Cohort, on_delete=models.CASCADE)
    study = models.ForeignKey(Study, on_delete=models.CASCADE)
    added_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["cohort", "study"], name="cohort_study_unique")]
