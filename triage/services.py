"""Triage services: score every study on arrival, mark studies read, override by hand.

`triage_study` is the background job (`precedent.tasks`, like embedding): it runs the
image-quality check on each image not checked yet, then decides the study's category
from, in this order of precedence,

1. a radiologist's own finding on the study (`Finding.source == "radiologist"`): an
   urgent class (PRECEDENT_URGENT_FINDINGS) makes it `urgent`, any other malignant or
   abnormal-unknown finding `suspicious` — a human flag outranks every model;
2. the quality check: no image a triage task can assess → `not_assessable`;
3. the models: with no active classifier (or no signed-off operating point) the study
   waits as `pending` and the worklist orders it as routine.

A result is written only when the outcome changes, so the job is idempotent and the
history holds real changes, not one row per arriving image. A category a radiologist
set by hand stands until a re-triage finds the study urgent.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from precedent.tasks import job
from studies.models import Finding, Instance, Study
from studies.services import dicom_store

from . import quality
from .models import Category, ImageQuality, OperatingPoint, StudyRead, TriageAudit, TriageModelVersion, TriageResult

log = logging.getLogger(__name__)

NO_MODEL_REASON = "no triage model is active yet"
# Radiologist findings that flag a study suspicious when their class is not urgent.
SUSPICIOUS_PATHOLOGIES = (Finding.Pathology.MALIGNANT, Finding.Pathology.UNKNOWN)


# --- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class UrgentRule:
    pathology: str  # "*" or a Finding.Pathology value
    abnormality_class: str  # "*" or a class, lower case

    def matches(self, pathology: str, abnormality_class: str) -> bool:
        return self.pathology in ("*", pathology) and self.abnormality_class in ("*", abnormality_class.lower())


def urgent_rules() -> list[UrgentRule]:
    """PRECEDENT_URGENT_FINDINGS parsed; a pathology that does not exist is a configuration error."""
    rules = []
    for entry in settings.PRECEDENT_URGENT_FINDINGS:
        pathology, _, cls = entry.rpartition(":")
        pathology = pathology.strip().lower() or "*"
        if pathology != "*" and pathology not in Finding.Pathology.values:
            raise ImproperlyConfigured(
                f"PRECEDENT_URGENT_FINDINGS entry {entry!r}: pathology must be * or one of"
                f" {', '.join(Finding.Pathology.values)}"
            )
        rules.append(UrgentRule(pathology, cls.strip().lower() or "*"))
    return rules


def qa_fraction() -> float:
    value = float(settings.PRECEDENT_TRIAGE_QA_FRACTION)
    if not 0.0 <= value <= 1.0:
        raise ImproperlyConfigured(f"PRECEDENT_TRIAGE_QA_FRACTION must be between 0 and 1, got {value}")
    return value


def triage_tasks() -> list[quality.Task]:
    try:
        return quality.tasks_named(settings.PRECEDENT_TRIAGE_TASKS)
    except ValueError as exc:
        raise ImproperlyConfigured(f"PRECEDENT_TRIAGE_TASKS: {exc}") from None


def qa_selected(study_instance_uid: str, *, fraction: float, seed: str) -> bool:
    """Whether a likely-negative study is one of the QA fraction read anyway.

    A hash of the seed and the study UID, not a random draw: the same study keeps its
    mark through every re-triage and in every process, and an auditor can recompute
    which studies were picked. Changing the seed picks another sample."""
    digest = hashlib.sha256(f"{seed}\x1f{study_instance_uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def qa_read_for(study: Study, category: str) -> bool:
    if category != Category.LIKELY_NEGATIVE:
        return False
    seed = str(settings.PRECEDENT_TRIAGE_QA_SEED)
    return qa_selected(study.study_instance_uid, fraction=qa_fraction(), seed=seed)


# --- the quality check on stored images -----------------------------------------------------


def image_facts(instance: Instance) -> quality.ImageFacts:
    series = instance.series
    return quality.ImageFacts(
        modality=series.modality,
        body_part=series.body_part,
        sop_class_uid=instance.sop_class_uid,
        has_pixel_data=instance.has_pixel_data,
        rows=instance.rows,
        columns=instance.columns,
        number_of_frames=instance.number_of_frames,
        bits_stored=instance.bits_stored,
        photometric_interpretation=instance.photometric_interpretation,
    )


def assess_study_images(study: Study, *, recheck: bool = False) -> list[ImageQuality]:
    """The quality verdict of every image of the study, checking those not checked yet
    (all of them with `recheck`). Never raises for bad pixel data."""
    instances = Instance.objects.filter(series__study=study).select_related("series").order_by("pk")
    if not recheck:
        instances = instances.filter(triage_quality__isnull=True)
    tasks = triage_tasks()
    store = dicom_store()
    for instance in instances:
        verdict = quality.assess(image_facts(instance), store.path(instance.file_path), tasks)
        ImageQuality.objects.update_or_create(
            instance=instance,
            defaults={
                "assessable": verdict.assessable,
                "task": verdict.task,
                "reasons": list(verdict.reasons),
                "metrics": verdict.metrics,
            },
        )
    return list(ImageQuality.objects.filter(instance__series__study=study).order_by("instance_id"))


# --- deciding the category (no database: plain values in, a Decision out) ------------------


@dataclass(frozen=True)
class ImageVerdict:
    assessable: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class RadiologistFinding:
    pathology: str
    abnormality_class: str

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.pathology, self.abnormality_class) if p)


@dataclass(frozen=True)
class ModelState:
    """Which models could score: the active classifier and the signed-off operating point."""

    classifier: str = ""
    operating_point: bool = False


@dataclass
class Decision:
    category: str
    reasons: list[str]
    scores: dict[str, Any] = field(default_factory=dict)


def decide(
    *,
    images: Sequence[ImageVerdict],
    findings: Sequence[RadiologistFinding],
    rules: Sequence[UrgentRule],
    models: ModelState,
) -> Decision:
    """The study's category and the reasons a radiologist reads next to it."""
    urgent = [f for f in findings if any(rule.matches(f.pathology, f.abnormality_class) for rule in rules)]
    if urgent:
        labels = dict.fromkeys(f.label for f in urgent)
        return Decision(Category.URGENT, [f"radiologist finding of an urgent class: {label}" for label in labels])
    suspicious = dict.fromkeys(f.label for f in findings if f.pathology in SUSPICIOUS_PATHOLOGIES)
    if suspicious:
        return Decision(Category.SUSPICIOUS, [f"radiologist finding: {label}" for label in suspicious])

    quality_reasons = _quality_reasons(images)
    if not any(image.assessable for image in images):
        return Decision(Category.NOT_ASSESSABLE, quality_reasons or ["the study has no images"])
    if not models.classifier:
        waiting = NO_MODEL_REASON
    elif not models.operating_point:
        waiting = f"no operating point is signed off for classifier {models.classifier} yet"
    else:
        waiting = f"scoring with classifier {models.classifier} is not available in this version yet"
    return Decision(Category.PENDING, [waiting, *quality_reasons])


def _quality_reasons(images: Sequence[ImageVerdict]) -> list[str]:
    """One line per distinct reason, with how many of the study's images it concerns
    unless it concerns them all: then the line stays the same as a series keeps
    arriving, and a 500-slice CT writes one result, not 500."""
    counts = Counter(reason for image in images if not image.assessable for reason in image.reasons)
    return [
        reason if count == len(images) else f"{count} of {len(images)} images: {reason}"
        for reason, count in counts.items()
    ]


def model_state() -> tuple[ModelState, list[TriageModelVersion], OperatingPoint | None]:
    classifier = TriageModelVersion.objects.filter(
        kind=TriageModelVersion.Kind.CLASSIFIER, status=TriageModelVersion.Status.ACTIVE
    ).first()
    point = None
    if classifier is not None:
        point = (
            OperatingPoint.objects.filter(model_versions=classifier, signed_off_at__isnull=False)
            .order_by("-signed_off_at")
            .first()
        )
    state = ModelState(classifier=classifier.name if classifier else "", operating_point=point is not None)
    return state, [classifier] if classifier else [], point


# --- the job ------------------------------------------------------------------------------


@job("triage.triage_study")
def triage_study(*, study_id: int, recheck: bool = False) -> TriageResult | None:
    """(Re)compute the study's current TriageResult. Idempotent; None if the study is gone."""
    study = Study.objects.filter(pk=study_id).first()
    if study is None:
        return None
    images = [ImageVerdict(q.assessable, tuple(q.reasons)) for q in assess_study_images(study, recheck=recheck)]
    findings = [
        RadiologistFinding(pathology, abnormality_class)
        for pathology, abnormality_class in Finding.objects.filter(
            instance__series__study=study, source=Finding.Source.RADIOLOGIST
        )
        .order_by("pk")
        .values_list("pathology", "abnormality_class")
    ]
    state, versions, point = model_state()
    decision = decide(images=images, findings=findings, rules=urgent_rules(), models=state)
    return _record(study, decision, versions, point)


def _record(
    study: Study, decision: Decision, versions: list[TriageModelVersion], point: OperatingPoint | None
) -> TriageResult | None:
    qa_read = qa_read_for(study, decision.category)
    with transaction.atomic():
        # Serialises triage of one study across workers: one current row, no lost update.
        if not Study.objects.select_for_update().filter(pk=study.pk).exists():
            return None
        current = TriageResult.objects.filter(study=study, is_current=True).first()
        if current is not None:
            if current.is_manual and decision.category != Category.URGENT:
                return current
            unchanged = (
                current.category == decision.category
                and current.reasons == decision.reasons
                and current.scores == decision.scores
                and current.qa_read == qa_read
                and current.operating_point_id == (point.pk if point else None)
                and {v.pk for v in current.model_versions.all()} == {v.pk for v in versions}
            )
            if unchanged:
                return current
            TriageResult.objects.filter(pk=current.pk).update(is_current=False)
        result = TriageResult.objects.create(
            study=study,
            category=decision.category,
            reasons=decision.reasons,
            scores=decision.scores,
            qa_read=qa_read,
            operating_point=point,
        )
        result.model_versions.set(versions)
    log.info("study %s triaged %s: %s", study.study_instance_uid, result.category, "; ".join(result.reasons))
    return result


def triage_studies(*, studies, recheck: bool = False, progress=None) -> Counter[str]:
    """Triage many studies in the caller (commands); returns how many fell in each category."""
    counts: Counter[str] = Counter()
    for study_id in studies.values_list("pk", flat=True).iterator():
        result = triage_study(study_id=study_id, recheck=recheck)
        if result is not None:
            counts[result.category] += 1
        if progress is not None:
            progress()
    return counts


# --- what users do: read marks and overrides -----------------------------------------------


def study_mark_read(*, study: Study, user: AbstractBaseUser, read: bool) -> StudyRead | None:
    """Mark a study read (for the whole reading group) or unread again."""
    if not read:
        StudyRead.objects.filter(study=study).delete()
        return None
    mark, _ = StudyRead.objects.get_or_create(study=study, defaults={"user": user})
    return mark


OVERRIDE_CATEGORIES = [
    Category.URGENT,
    Category.SUSPICIOUS,
    Category.ROUTINE,
    Category.LIKELY_NEGATIVE,
    Category.NOT_ASSESSABLE,
]


@transaction.atomic
def triage_override(*, study: Study, category: str, user: AbstractBaseUser, note: str = "") -> TriageResult:
    """Set the study's category by hand; audited. Raises ValueError for a category a
    person cannot choose (pending is the machine's state, not a judgement)."""
    if category not in OVERRIDE_CATEGORIES:
        raise ValueError(f"category must be one of {', '.join(OVERRIDE_CATEGORIES)}")
    Study.objects.select_for_update().get(pk=study.pk)
    current = TriageResult.objects.filter(study=study, is_current=True).first()
    reason = f"category set by hand by {user.get_username()}" + (f": {note}" if note else "")
    if current is not None:
        TriageResult.objects.filter(pk=current.pk).update(is_current=False)
    result = TriageResult.objects.create(
        study=study,
        category=category,
        reasons=[reason],
        scores=current.scores if current else {},
        qa_read=qa_read_for(study, category),
        operating_point=current.operating_point if current else None,
        overridden_by=user,
    )
    if current is not None:
        result.model_versions.set(current.model_versions.all())
    TriageAudit.objects.create(
        action=TriageAudit.Action.OVERRIDE,
        user=user,
        study=study,
        before={"category": current.category, "reasons": current.reasons} if current else {},
        after={"category": category, "reasons": [reason]},
        note=note,
    )
    return result
