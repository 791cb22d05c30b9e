"""Triage services: score every study on arrival, mark studies read, override by hand.

`triage_study` is the background job (`precedent.tasks`, like embedding): it runs the
image-quality check on each image not checked yet, then decides the study's category
from, in this order of precedence,

1. a radiologist's own finding on the study (`Finding.source == "radiologist"`): an
   urgent class (PRECEDENT_URGENT_FINDINGS) makes it `urgent`, any other malignant or
   abnormal-unknown finding `suspicious` — a human flag outranks every model;
2. the quality check: no image a triage task can assess → `not_assessable`;
3. the models: the signed-off operating point's exam score (its `score_source`: the
   classifier's P(abnormal), the detector's best box or both fused, exam_score.py,
   from the point's own model versions) against its threshold; with no signed-off
   point for the active models, or no image they could score, the study waits as
   `pending` and the worklist orders it as routine.

A result is written only when the outcome changes, so the job is idempotent and the
history holds real changes, not one row per arriving image. A category a radiologist
set by hand stands until a re-triage finds the study urgent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Count, Max, QuerySet
from django.utils import timezone
from tqdm.auto import tqdm

from precedent.db import write_while_targets_exist
from precedent.tasks import enqueue, job
from studies.errors import RenderError
from studies.models import Cohort, Finding, Instance, Series, Study
from studies.services import dicom_store

from . import quality
from .models import (
    Category,
    ImageQuality,
    OperatingPoint,
    SegmentationMask,
    StudyRead,
    TriageAudit,
    TriageModelVersion,
    TriageResult,
)

if TYPE_CHECKING:  # torch is imported lazily: the worklist alone never needs it
    from torch import nn

    from .weights import ModelMeta

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
    checked = []
    for instance in instances:
        verdict = quality.assess(image_facts(instance), store.path(instance.file_path), tasks)
        checked.append(
            ImageQuality(
                instance=instance,
                assessable=verdict.assessable,
                task=verdict.task,
                reasons=list(verdict.reasons),
                metrics=verdict.metrics,
            )
        )
    store_verdicts(checked)
    return list(ImageQuality.objects.filter(instance__series__study=study).order_by("instance_id"))


def store_verdicts(verdicts: Sequence[ImageQuality]) -> None:
    """Store quality verdicts, in one statement for the whole study (a CT series is
    hundreds of images). A verdict a concurrent run wrote meanwhile is replaced by this
    one; an image deleted while it was being checked gets none."""

    def write() -> None:
        alive = set(Instance.objects.filter(pk__in=[v.instance_id for v in verdicts]).values_list("pk", flat=True))
        kept = [v for v in verdicts if v.instance_id in alive]
        for verdict in kept:
            verdict.pk = None  # an attempt rolled back had given it an id
        ImageQuality.objects.bulk_create(
            kept,
            batch_size=500,
            update_conflicts=True,
            unique_fields=["instance"],
            update_fields=["assessable", "task", "reasons", "metrics", "checked_at"],
        )

    write_while_targets_exist(write)


def assess_cohort_images(cohort: Cohort, *, progress: bool = False) -> int:
    """Check the images of the cohort's studies that have no quality verdict yet, as
    arrival would, so that calibration and evaluation score the images triage scores.
    Returns how many studies needed it."""
    studies = list(
        Study.objects.filter(cohorts=cohort, series__instances__triage_quality__isnull=True).distinct().order_by("pk")
    )
    for study in tqdm(studies, desc="quality", unit="study", disable=not progress or not studies):
        assess_study_images(study)
    return len(studies)


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
    """Which models could score: the active classifier and detector, and the signed-off
    operating point in use with the exam score it was calibrated on."""

    classifier: str = ""
    operating_point: bool = False
    threshold: float | None = None  # the signed-off point's threshold on the exam score
    detector: str = ""
    score_source: str = "classifier"  # exam_score.SOURCES: which score the threshold applies to
    # Set for one study when the point was calibrated on images of other tasks only
    # (point_tasks): its threshold says nothing about this study's images.
    uncovered_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelDetection:
    """A detector's box summarised for deciding: `label` is "class" or "pathology:class"
    (matched against PRECEDENT_URGENT_FINDINGS like a radiologist's finding)."""

    label: str
    score: float
    sop_instance_uid: str


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
    scores: dict[str, Any] | None = None,
    detections: Sequence[ModelDetection] = (),
) -> Decision:
    """The study's category and the reasons a radiologist reads next to it.

    `scores` is the study's exam score under the signed-off point's source
    (exam_score.study_scores: the classifier's combined output, the detector's best
    box per image, or both), None when the models it needs did not score the study;
    `detections` the active detector's boxes."""
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

    urgent_boxes, suspicious_boxes = _detection_flags(detections, rules)
    if urgent_boxes:
        return Decision(Category.URGENT, urgent_boxes + quality_reasons, dict(scores or {}))
    if scores is not None and models.operating_point and models.threshold is not None:
        decision = _score_decision(scores, models)
        if suspicious_boxes and decision.category in (Category.ROUTINE, Category.LIKELY_NEGATIVE):
            decision = Decision(Category.SUSPICIOUS, suspicious_boxes + decision.reasons, decision.scores)
        decision.reasons.extend(quality_reasons)
        return decision
    if suspicious_boxes:
        return Decision(Category.SUSPICIOUS, suspicious_boxes + quality_reasons, dict(scores or {}))
    if not models.classifier and not models.detector:
        waiting = NO_MODEL_REASON
    elif not models.operating_point:
        waiting = f"no operating point is signed off for {_active_names(models)} yet"
    elif models.uncovered_by:
        waiting = (
            f"the signed-off operating point was calibrated on {' and '.join(models.uncovered_by)} images only: "
            "its threshold does not apply to this study's images"
        )
    elif models.score_source == "detector":
        waiting = f"detector {models.detector} ran on no image of this study"
    elif models.score_source == "fused":
        waiting = f"the fused score needs classifier {models.classifier} and detector {models.detector} on a mammogram"
    else:
        waiting = f"classifier {models.classifier} scores mammograms only: no image of this study was scored"
    return Decision(Category.PENDING, [waiting, *quality_reasons])


def _active_names(models: ModelState) -> str:
    names = [f"classifier {models.classifier}"] if models.classifier else []
    names += [f"detector {models.detector}"] if models.detector else []
    return " and ".join(names)


def _detection_flags(detections: Sequence[ModelDetection], rules: Sequence[UrgentRule]) -> tuple[list[str], list[str]]:
    """Reasons from detector boxes: urgent ones (an urgent class at or above
    PRECEDENT_TRIAGE_URGENT_DETECTION_SCORE), suspicious ones (any class at or above
    PRECEDENT_TRIAGE_SUSPICIOUS_DETECTION_SCORE); the best box per label.

    A box names a class, not a pathology (a detector cannot tell a malignant mass from
    a benign one of the same shape): it counts for the rules of its class whose
    pathology is * or malignant, as the lesion it may be, and the urgent score guards.
    """
    urgent_score = float(settings.PRECEDENT_TRIAGE_URGENT_DETECTION_SCORE)
    suspicious_score = float(settings.PRECEDENT_TRIAGE_SUSPICIOUS_DETECTION_SCORE)
    best: dict[str, float] = {}
    for d in detections:
        best[d.label] = max(best.get(d.label, 0.0), float(d.score))
    urgent, suspicious = [], []
    for label, score in sorted(best.items(), key=lambda item: -item[1]):
        pathology, _, cls = label.rpartition(":")
        is_urgent = any(rule.matches(pathology.strip().lower() or "malignant", cls.strip()) for rule in rules)
        if is_urgent and score >= urgent_score:
            urgent.append(f"detector: {label} (score {score:.2f} ≥ urgent {urgent_score:.2f})")
        elif score >= suspicious_score:
            suspicious.append(f"detector: {label} (score {score:.2f} ≥ suspicious {suspicious_score:.2f})")
    return urgent, suspicious


def _score_decision(scores: dict[str, Any], models: ModelState) -> Decision:
    """Suspicious on the classifier's P(malignant) when it scored; otherwise the exam
    score of the point's source against the point's threshold."""
    exam = scores["exam"]
    source = scores.get("score_source", models.score_source)
    score = float(exam["score"] if "score" in exam else exam["p_abnormal"])
    threshold = float(models.threshold)
    suspicious_at = float(settings.PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT)
    worst = max(scores.get("breasts", {}).items(), key=lambda item: item[1]["p_abnormal"], default=None)
    where = f" (highest: {_SIDES.get(worst[0], 'unknown side')} breast)" if worst else ""
    numbers = []
    if "p_abnormal" in exam:
        numbers.append(f"P(abnormal) {float(exam['p_abnormal']):.3f}, P(malignant) {float(exam['p_malignant']):.3f}")
    if "p_detector" in exam and source != "detector":  # the detector's score is its best box: said once
        numbers.append(f"best detector box {float(exam['p_detector']):.3f}")
    numbers_text = "".join(f"; {n}" for n in numbers)
    if "p_malignant" in exam and float(exam["p_malignant"]) >= suspicious_at:
        p_malignant = float(exam["p_malignant"])
        return Decision(
            Category.SUSPICIOUS,
            [
                f"classifier {models.classifier}: P(malignant) {p_malignant:.3f} ≥ {suspicious_at:.2f}{where}"
                f"{numbers_text}"
            ],
            scores,
        )
    if source == "detector":
        what = f"detector {models.detector}: best box score {score:.3f}"
    elif source == "fused":
        what = f"classifier {models.classifier} + detector {models.detector}: fused score {score:.3f}"
    else:
        what = f"classifier {models.classifier}: P(abnormal) {score:.3f}"
    if score < threshold:
        return Decision(
            Category.LIKELY_NEGATIVE,
            [f"{what} below the signed-off threshold {threshold:.3f}{numbers_text}"],
            scores,
        )
    return Decision(
        Category.ROUTINE,
        [f"{what} at or above the signed-off threshold {threshold:.3f}{where}{numbers_text}"],
        scores,
    )


_SIDES = {"L": "left", "R": "right", "?": "unknown side"}


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
    """The active scoring models, the signed-off point in use (selectors.signed_off_point:
    its versions are the active ones its score source needs) and the versions a
    result records: the point's, the active classifier (its P(malignant) is used
    whatever score the point thresholds; without a point, the study waits for it) and
    the active detector (its boxes can flag a study)."""
    from .selectors import active_scoring_versions, signed_off_point

    active = active_scoring_versions()
    classifier = active.get(TriageModelVersion.Kind.CLASSIFIER)
    detector = active.get(TriageModelVersion.Kind.DETECTOR)
    point = signed_off_point(active=active)
    state = ModelState(
        classifier=classifier.name if classifier else "",
        operating_point=point is not None,
        threshold=point.threshold if point is not None else None,
        detector=detector.name if detector else "",
        score_source=point.score_source if point is not None else OperatingPoint.ScoreSource.CLASSIFIER,
    )
    versions = list(point.model_versions.all()) if point is not None else []
    # The active classifier scores beside any point (its P(malignant) flags suspicious
    # exams), and the active detector's boxes can flag a study.
    for version in (classifier, detector):
        if version is not None and version not in versions:
            versions.append(version)
    return state, versions, point


# --- model versions -----------------------------------------------------------------------


def triage_models_dir() -> Path:
    path = Path(settings.PRECEDENT_HOME) / "models" / "triage"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _version_name(kind: str, meta: ModelMeta, digest: str) -> str:
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    return f"{kind}-{meta.architecture}-{stamp}-{digest[:8]}"[:100]


def triage_model_register(
    *, kind: str, model: nn.Module, meta: ModelMeta, name: str = "", activate: bool = False
) -> TriageModelVersion:
    """Save the weights under PRECEDENT_HOME/models/triage/ and add a TriageModelVersion
    (status "ready", or "active" with `activate`). The file is written first and removed
    again if the row cannot be created, so no orphan file or row is left behind."""
    if kind not in TriageModelVersion.Kind.values:
        raise ValueError(f"kind must be one of {', '.join(TriageModelVersion.Kind.values)}")
    if meta.kind != kind:
        raise ValueError(f"the model's metadata says {meta.kind!r}, registered as {kind!r}")
    if name and TriageModelVersion.objects.filter(name=name).exists():
        raise ValueError(f"a triage model named {name!r} exists already")
    from .weights import save_model

    tmp = triage_models_dir() / f".incoming-{uuid.uuid4().hex}.pt"
    sha256 = save_model(tmp, model, meta)
    name = name or _version_name(kind, meta, sha256)
    target = triage_models_dir() / f"{name}.pt"
    try:
        with transaction.atomic():
            version = TriageModelVersion.objects.create(
                name=name,
                kind=kind,
                architecture=meta.architecture,
                weights_path=str(target.relative_to(settings.PRECEDENT_HOME)),
                sha256=sha256,
                metadata=meta.to_dict(),
            )
            os.replace(tmp, target)
            if activate:
                triage_model_activate(version=version, via="command")
    except BaseException:
        tmp.unlink(missing_ok=True)
        if not TriageModelVersion.objects.filter(name=name).exists():
            target.unlink(missing_ok=True)
        raise
    return version


@transaction.atomic
def triage_model_activate(
    *, version: TriageModelVersion, user: AbstractBaseUser | None = None, via: str = "command", request=None
) -> TriageModelVersion:
    """Make `version` the one active model of its kind; the previous one is retired
    (a retired version may come back: a rollback). Audited, with the version it
    replaced. Unread studies decided under the previous versions are then re-triaged
    in the background (`retriage_outdated`): with a signed-off point that applies to
    the versions now active (one calibrated on this version before the switch:
    calibrate_triage --detector NAME), else they wait as pending. Activating the
    active version changes nothing."""
    # Evaluated, so the rows of this kind stay locked until the switch commits.
    rows = list(TriageModelVersion.objects.select_for_update().filter(kind=version.kind).order_by("pk"))
    current = next((v for v in rows if v.pk == version.pk), version)
    if current.status == TriageModelVersion.Status.ACTIVE:
        version.status, version.activated_at = current.status, current.activated_at
        return version
    from .selectors import signed_off_point

    previous = next((v for v in rows if v.status == TriageModelVersion.Status.ACTIVE), None)
    point_before = signed_off_point()
    if previous is not None:
        previous.status = TriageModelVersion.Status.RETIRED
        previous.save(update_fields=["status"])
    version.status = TriageModelVersion.Status.ACTIVE
    version.activated_at = timezone.now()
    version.save(update_fields=["status", "activated_at"])
    point_after = signed_off_point()
    _model_audit(
        version=version,
        user=user,
        via=via,
        request=request,
        note="activated",
        before={"active": previous.name if previous else None, "operating_point": _point_id(point_before)},
        operating_point=point_after,
    )
    # Unread studies decided by the model this one replaces are decided again: with the
    # point that applies now, or they wait as pending until one is signed off.
    enqueue("triage.retriage_outdated")
    return version


def _point_id(point: OperatingPoint | None) -> int | None:
    return point.pk if point is not None else None


@transaction.atomic
def triage_model_retire(
    *, version: TriageModelVersion, user: AbstractBaseUser | None = None, via: str = "command", request=None
) -> TriageModelVersion:
    """Take a version out of service (e.g. a model found to misbehave). With no model
    of its kind active, what needed it waits as pending, unread studies it decided
    too (`retriage_outdated`); the worklist keeps working. Audited. Retiring a version
    that is not active changes nothing."""
    current = TriageModelVersion.objects.select_for_update().get(pk=version.pk)
    if current.status != TriageModelVersion.Status.ACTIVE:
        version.status = current.status
        return version
    from .selectors import signed_off_point

    point_before = signed_off_point()
    version.status = TriageModelVersion.Status.RETIRED
    version.save(update_fields=["status"])
    _model_audit(
        version=version,
        user=user,
        via=via,
        request=request,
        note="retired",
        before={"active": version.name, "operating_point": _point_id(point_before)},
        operating_point=signed_off_point(),
    )
    # A model taken out of service stops ruling studies out: unread studies it decided
    # are decided again without it (pending where nothing else applies).
    enqueue("triage.retriage_outdated")
    return version


def _model_audit(
    *,
    version: TriageModelVersion,
    user,
    via: str,
    request,
    note: str,
    before: dict[str, Any],
    operating_point: OperatingPoint | None,
) -> None:
    """A model switch in the triage audit and the platform audit log; `via` is the door
    (access.models.Via: "command", or "page" for the admin's actions). The switch can
    change which signed-off point triage uses (or leave none): both are recorded."""
    after = {
        "kind": version.kind,
        "version": version.name,
        "status": version.status,
        "via": via,
        "operating_point": _point_id(operating_point),
    }
    TriageAudit.objects.create(action=TriageAudit.Action.MODEL, user=user, before=before, after=after, note=note)
    _access_audit(
        request=request,
        user=user,
        via=via,
        action=f"triage.model.{'activate' if note == 'activated' else 'retire'}",
        target_type="triage_model",
        target=version.name,
        details={**after, **{f"before_{k}": v for k, v in before.items()}},
    )


@dataclass(frozen=True)
class LoadedModel:
    version: TriageModelVersion
    module: nn.Module  # in eval mode, on the CPU
    meta: ModelMeta


def _builder(kind: str):
    # Imported lazily: a process that only serves the worklist never loads torch models.
    if kind == TriageModelVersion.Kind.CLASSIFIER:
        from . import classifier as core
    elif kind == TriageModelVersion.Kind.DETECTOR:
        from . import detection as core
    elif kind == TriageModelVersion.Kind.SEGMENTER:
        from . import segmentation as core
    else:
        raise ValueError(f"unknown triage model kind {kind!r}")
    return core.build_from_meta


_loaded_models: dict[int, LoadedModel] = {}
_loaded_lock = threading.Lock()


def load_triage_model(version: TriageModelVersion) -> LoadedModel:
    """The version's module, loaded once per process (cached by version pk). Raises
    ModelFileError when the file is missing, damaged or not the registered one."""
    from .weights import ModelFileError, file_sha256, load_model_file

    with _loaded_lock:
        cached = _loaded_models.get(version.pk)
        if cached is not None and cached.version.sha256 == version.sha256:
            return cached
    path = Path(settings.PRECEDENT_HOME) / version.weights_path
    if not path.is_file():
        raise ModelFileError(f"weights file of {version.name} is missing")
    if file_sha256(path) != version.sha256:
        raise ModelFileError(f"weights file of {version.name} does not match its registered sha256")
    state, meta = load_model_file(path)
    module = _builder(meta.kind)(meta)
    module.load_state_dict(state, strict=True)
    loaded = LoadedModel(version=version, module=module.eval(), meta=meta)
    with _loaded_lock:
        _loaded_models[version.pk] = loaded
    return loaded


def active_triage_model(kind: str) -> LoadedModel | None:
    """The active model of `kind`, loaded (cached per process by version pk), or None."""
    version = TriageModelVersion.objects.filter(kind=kind, status=TriageModelVersion.Status.ACTIVE).first()
    if version is None:
        return None
    return load_triage_model(version)


def train_classifier(
    *,
    cohort: Cohort,
    epochs: int | None = None,
    device: str | None = None,
    seed: int = 0,
    name: str = "",
    activate: bool = False,
    progress: bool = True,
    **options: Any,
) -> TriageModelVersion:
    """Train the mammogram classifier on the cohort's labelled images (see
    `classifier_training_set`) and register it. Extra keyword options (init weights,
    input size, batch size ...) go to `triage.training.ClassifierConfig`."""
    return _train_classifier(
        cohort=cohort,
        epochs=epochs,
        device=device,
        seed=seed,
        name=name,
        activate=activate,
        progress=progress,
        **options,
    )


# --- the classifier: training, scoring, calibration ---------------------------------------

CLASSIFIER_TASK = "mammography"  # the quality task whose images the classifier scores


def model_sees(kind: str, loaded: LoadedModel, verdict: ImageQuality | None) -> bool:
    """Whether triage on arrival gives this image to the model: only assessable images,
    the classifier only mammograms (classify_study), the detector and segmenter only
    images of the tasks they were trained on (localisation). Calibration and evaluation
    apply the same rule, so a threshold is never fitted on images triage never scores."""
    if verdict is None or not verdict.assessable:
        return False
    if kind == TriageModelVersion.Kind.CLASSIFIER:
        return verdict.task == CLASSIFIER_TASK
    from .localisation import fits

    return fits(loaded, verdict.task)


def init_weights_path(*, weights: Path | str | None = None, init_from_encoder: bool = False) -> str:
    """The checkpoint a model's trunk starts from: a file the user gave, or the active
    search encoder's weights (transfer learning); "" for a random start."""
    if not init_from_encoder:
        return str(weights) if weights else ""
    from embeddings.models import EncoderVersion

    encoder = EncoderVersion.objects.filter(status=EncoderVersion.Status.ACTIVE).first()
    if encoder is None:
        raise ValueError("no search encoder is active to start from")
    return str(Path(settings.PRECEDENT_HOME) / encoder.weights_path)


def _train_classifier(
    *,
    cohort: Cohort,
    epochs: int | None,
    device: str | None,
    seed: int,
    name: str,
    activate: bool,
    progress: bool,
    weights: Path | str | None = None,
    init_from_encoder: bool = False,
    input_size: int | None = None,
    batch_size: int | None = None,
    patch_size: int | None = None,
    max_seconds: float | None = None,
) -> TriageModelVersion:
    from . import classifier as core
    from . import training
    from .selectors import decode_instance, labelled_images

    init = init_weights_path(weights=weights, init_from_encoder=init_from_encoder)
    if init:  # a bad file fails now, not after the cohort is decoded
        core.init_backbone(core.build_classifier(training.ClassifierConfig().architecture), init)
    labelled = labelled_images(cohort=cohort)
    if not labelled:
        raise ValueError(f"cohort {cohort.name!r} has no labelled images (no studies.Finding rows)")
    items = []
    for item in labelled:
        try:
            pixels, monochrome1 = decode_instance(item.instance)
        except (RenderError, OSError, ValueError) as exc:
            log.warning("classifier training skips %s: %s", item.instance.sop_instance_uid, exc)
            continue
        items.append(
            training.TrainingItem(
                pixels, item.abnormal, item.malignant, item.boxes, monochrome1, item.instance.sop_instance_uid
            )
        )
    defaults = training.ClassifierConfig()
    config = training.ClassifierConfig(
        epochs=epochs or defaults.epochs,
        input_size=input_size or defaults.input_size,
        batch_size=batch_size or defaults.batch_size,
        patch_size=defaults.patch_size if patch_size is None else patch_size,
        init_weights=init,
        seed=seed,
        max_seconds=max_seconds,
    )
    model, report = training.train_classifier(items, config, device=device, progress=progress)
    meta = core.classifier_meta(model, training=report.as_meta(cohort=cohort.name))
    return triage_model_register(
        kind=TriageModelVersion.Kind.CLASSIFIER, model=model, meta=meta, name=name, activate=activate
    )


def classify_study(study: Study, loaded: LoadedModel) -> dict[str, Any] | None:
    """Classifier scores of the study's assessable mammography images, combined per
    breast and exam (classifier.combine), or None when none of them can be scored."""
    from .classifier import ImageScore, combine
    from .selectors import score_instances

    instances = list(
        Instance.objects.filter(
            series__study=study, triage_quality__assessable=True, triage_quality__task=CLASSIFIER_TASK
        ).order_by("pk")
    )
    if not instances:
        return None
    scores = score_instances(module=loaded.module, instances=instances)
    images = [ImageScore(i.sop_instance_uid, i.laterality, *scores[i.pk]) for i in instances if i.pk in scores]
    return combine(images) if images else None


def study_exam_scores(
    study: Study,
    *,
    point: OperatingPoint,
    qualities: Sequence[ImageQuality],
    classifier: TriageModelVersion | None = None,
) -> dict[str, Any] | None:
    """The study's scores under the point's score source, from the point's own model
    versions (exam_score.study_scores), or None when a model the source needs did not
    score it (no mammogram for the classifier, no image the detector ran on, a weights
    file that cannot be loaded: the study waits, the reason is logged).

    When the point thresholds another score, `classifier` (the active one) still scores
    the mammograms beside it: its P(malignant) can flag the exam suspicious, and its
    per-image and per-breast scores are shown, whatever the threshold applies to.
    """
    from .exam_score import NEEDS, study_scores

    needs = NEEDS[point.score_source]
    versions = {v.kind: v for v in point.model_versions.all()}
    classifier = versions.get(TriageModelVersion.Kind.CLASSIFIER, classifier)
    classifier_scores = None
    can_classify = any(q.assessable and q.task == CLASSIFIER_TASK for q in qualities)
    if "classifier" in needs and not can_classify:
        return None
    if classifier is not None and can_classify:
        try:
            classifier_scores = classify_study(study, load_triage_model(classifier))
        except ValueError as exc:  # a missing or damaged weights file
            log.error("classifier unavailable: %s", exc)
            if "classifier" in needs:
                return None
    detector_images = None
    if "detector" in needs:
        from .selectors import study_detector_scores

        detector_images = study_detector_scores(study=study, version=versions[TriageModelVersion.Kind.DETECTOR])
    scores = study_scores(
        point.score_source,
        classifier=classifier_scores if "classifier" in needs else None,
        detector_images=detector_images,
    )
    if scores is not None and classifier_scores is not None and "classifier" not in needs:
        scores = {**classifier_scores, **scores, "exam": {**classifier_scores.get("exam", {}), **scores["exam"]}}
    return scores


def point_tasks(point: OperatingPoint) -> tuple[str, ...]:
    """The tasks (quality.py: mammography, chest) of the images the point's validation
    exams were scored on; empty for a point computed before they were recorded."""
    return tuple((point.validation or {}).get("tasks") or ())


def point_covers(point: OperatingPoint, qualities: Sequence[ImageQuality]) -> bool:
    """Whether the point's threshold may decide a study with these images: one of them
    is assessable and of a task the point was calibrated on. A detector trained on
    mammograms and chest films, calibrated on a mammography cohort, must not rule
    chest films out with a mammography threshold."""
    tasks = point_tasks(point)
    return not tasks or any(q.assessable and q.task in tasks for q in qualities)


def training_patients(versions: Sequence[TriageModelVersion], patients: set[int]) -> dict[str, int]:
    """For each version trained on a cohort that shares patients (Patient rows: the
    PatientID within its issuer) with `patients`: how many. The training cohort is the
    one its metadata names; a cohort deleted since cannot be checked and counts as none."""
    shared = {}
    for version in versions:
        cohort = ((version.metadata or {}).get("training") or {}).get("cohort")
        if not cohort:
            continue
        trained = set(Study.objects.filter(cohorts__name=cohort).values_list("patient_id", flat=True))
        if count := len(trained & patients):
            shared[version.name] = count
    return shared


def default_score_source(models: Mapping[str, Any] | None = None) -> str:
    """calibrate_triage's default: the detector's score when a detector is active (on
    the MIAS patient-level validation split it ranked exams better than the classifier
    and than both fused, README Figures), else the classifier's. The point records
    the source either way; `--score` chooses another. `models` (by kind) stands in for
    the active ones when candidates are evaluated."""
    from .selectors import active_scoring_versions

    if TriageModelVersion.Kind.DETECTOR in (active_scoring_versions() if models is None else models):
        return OperatingPoint.ScoreSource.DETECTOR
    return OperatingPoint.ScoreSource.CLASSIFIER


def triage_model_named_or_active(kind: str, name: str | None = None) -> LoadedModel | None:
    """The version of `kind` named `name` (any status: a candidate not serving yet),
    loaded, or else the active one (None when there is none). ValueError for a name
    that is unknown or of another kind."""
    if not name:
        return active_triage_model(kind)
    version = TriageModelVersion.objects.filter(name=name).first()
    if version is None:
        raise ValueError(f"no triage model version named {name!r}")
    if version.kind != kind:
        raise ValueError(f"{name} is a {version.kind}, not a {kind}")
    return load_triage_model(version)


def scoring_models(source: str, models: Mapping[str, LoadedModel | None] | None = None) -> dict[str, LoadedModel]:
    """The models the score source needs, loaded: those given by kind in `models`
    (candidates), else the active ones; ValueError naming what is missing."""
    from .exam_score import NEEDS, check_source

    loaded = {}
    for kind in NEEDS[check_source(source)]:
        model = (models or {}).get(kind) or active_triage_model(kind)
        if model is None:
            raise ValueError(
                f"no {kind} is active (the {source} score needs one): train one with train_triage --model {kind}"
                f" --activate, or name one with --{kind}"
            )
        loaded[kind] = model
    return loaded


@transaction.atomic
def operating_point_compute(
    *,
    cohort: Cohort,
    target_sensitivity: float = 1.0,
    source: str | None = None,
    progress: bool = False,
    models: Mapping[str, LoadedModel | None] | None = None,
    allow_training_patients: bool = False,
) -> OperatingPoint:
    """Score the (validation) cohort with the active models the score `source` needs
    (default: default_score_source()), or with the candidate versions in `models` by
    kind, compute ROC and workload curves at exam level and store the threshold that
    keeps `target_sensitivity` as an OperatingPoint with its source and model
    versions, not signed off. A point on candidates can be signed off before they are
    activated, and then applies from the moment they are. Raises ValueError with the
    reason (a model the source needs is missing, no labels, one class only, patients
    a model was trained on, unless `allow_training_patients`: the point records them)."""
    from . import metrics
    from .selectors import active_scoring_versions, cohort_exam_scores, scored_exams

    given = {kind: m for kind, m in (models or {}).items() if m is not None}
    source = source or default_score_source({**active_scoring_versions(), **given})
    loaded = scoring_models(source, given)
    classifier, detector = loaded.get("classifier"), loaded.get("detector")
    assess_cohort_images(cohort, progress=progress)
    labelled = cohort_exam_scores(cohort=cohort, classifier=classifier, detector=detector, progress=progress)
    exams = scored_exams(labelled, source)
    if not exams:
        raise ValueError(
            f"none of the {len(labelled)} labelled exams of cohort {cohort.name!r} could be scored by the {source} "
            "score: no image is assessable, of the model's task, and decodable"
        )
    labels = [e.abnormal for e in exams]
    if len(set(labels)) < 2:
        raise ValueError(f"cohort {cohort.name!r} needs normal and abnormal exams to calibrate, has one class only")
    patients = {e.study.patient_id for e in exams}  # Patient rows: PatientID within its issuer
    seen_in_training = training_patients([m.version for m in (classifier, detector) if m is not None], patients)
    if seen_in_training and not allow_training_patients:
        raise ValueError(
            f"cohort {cohort.name!r} holds patients the models were trained on ("
            + ", ".join(f"{n} of {len(patients)} in {name}'s training cohort" for name, n in seen_in_training.items())
            + "): a threshold fitted on them promises more than new patients get; calibrate on patients kept apart "
            "(`cohort split`)"
        )
    scores = [e.score(source) for e in exams]
    point = metrics.threshold_for_sensitivity(labels, scores, target_sensitivity)
    validation = {
        "target_sensitivity": target_sensitivity,
        "score_source": source,
        "exams": len(exams),
        # Labelled exams triage could not score either (not assessable, no image of the
        # model's task): they never reach the threshold, so they are not in the curve.
        "left_out_exams": len(labelled) - len(exams),
        "abnormal_exams": sum(labels),
        "normal_exams": len(labels) - sum(labels),
        "patients": len(patients),
        "auc_abnormal": metrics.auc(labels, scores),
        "rule_out_at_full_sensitivity": metrics.rule_out_at_full_sensitivity(labels, scores),
        # What the validation cohort's size lets the point promise (exact 95 % intervals).
        **metrics.counts_at(labels, scores, point.threshold),
        "curve": metrics.curve_dicts(metrics.curve(labels, scores)),
        "classifier": classifier.version.name if classifier else None,
        "detector": detector.version.name if detector else None,
        "level": "exam",
        "training_patients": seen_in_training,  # by model: validation patients it was trained on (allowed)
        # The tasks of the images scored: the threshold decides studies of these only.
        "tasks": sorted(
            set(
                ImageQuality.objects.filter(
                    instance__in=[image.instance for e in exams for image, *_scores in e.images], assessable=True
                ).values_list("task", flat=True)
            )
            - {""}
        ),
    }
    op = OperatingPoint.objects.create(
        score_source=source,
        threshold=point.threshold,
        sensitivity=point.sensitivity,
        specificity=point.specificity,
        workload_reduction=point.workload_reduction,
        validation_cohort=cohort,
        validation=validation,
        computed_at=timezone.now(),
    )
    op.model_versions.set([m.version for m in loaded.values()])
    return op


def operating_point_at_threshold(*, point: OperatingPoint, threshold: float) -> OperatingPoint:
    """A new point, not signed off, at another threshold of `point`'s validation run:
    one the admin picks on its curve (the page), with the figures the curve holds for
    it and their counts and exact intervals. Same models, score source and cohort.
    Raises ValueError for a threshold that is not on the curve."""
    from . import metrics

    validation = point.validation or {}
    chosen = next(
        (
            c
            for c in validation.get("curve") or []
            if c["threshold"] is not None and abs(c["threshold"] - threshold) < 1e-9
        ),
        None,
    )
    if chosen is None or point.computed_at is None or point.validation_cohort_id is None:
        raise ValueError(f"{threshold:g} is not a threshold on operating point {point.pk}'s validation curve")
    abnormal, normal = int(validation.get("abnormal_exams", 0)), int(validation.get("normal_exams", 0))
    flagged, ruled_out = round(chosen["sensitivity"] * abnormal), round(chosen["specificity"] * normal)
    derived = OperatingPoint.objects.create(
        score_source=point.score_source,
        threshold=chosen["threshold"],
        sensitivity=chosen["sensitivity"],
        specificity=chosen["specificity"],
        workload_reduction=chosen["workload_reduction"],
        validation_cohort=point.validation_cohort,
        validation={
            **validation,
            "target_sensitivity": None,
            "chosen_from": point.pk,  # picked on the curve of that point's validation run
            "sensitivity_counts": [flagged, abnormal],
            "sensitivity_ci95": metrics.proportion_interval(flagged, abnormal),
            "specificity_counts": [ruled_out, normal],
            "specificity_ci95": metrics.proportion_interval(ruled_out, normal),
        },
        computed_at=point.computed_at,
    )
    derived.model_versions.set(point.model_versions.all())
    return derived


def operating_point_sign_off(
    *, point: OperatingPoint, user: AbstractBaseUser, via: str = "web", request=None
) -> OperatingPoint:
    """Sign off a computed operating point (audited); unread studies decided under
    another point, and those waiting as pending, are then re-triaged in the
    background (`retriage_outdated`). Raises ValueError when the point has no
    validation run behind it or is signed off already (the database constraint would
    refuse the first anyway)."""
    with transaction.atomic():
        point = OperatingPoint.objects.select_for_update().get(pk=point.pk)
        if point.signed_off_at is not None:
            raise ValueError(f"operating point {point.pk} is signed off already")
        if point.validation_cohort_id is None or point.computed_at is None:
            raise ValueError(f"operating point {point.pk} has no validation run behind it: run calibrate_triage")
        point.signed_off_by = user
        point.signed_off_at = timezone.now()
        point.save(update_fields=["signed_off_by", "signed_off_at"])
        after = {
            "score_source": point.score_source,
            "threshold": point.threshold,
            "sensitivity": point.sensitivity,
            "specificity": point.specificity,
            "workload_reduction": point.workload_reduction,
            "validation_cohort": point.validation_cohort.name,
            "via": via,
        }
        TriageAudit.objects.create(
            action=TriageAudit.Action.OPERATING_POINT, user=user, operating_point=point, after=after, note="signed off"
        )
        _access_audit(
            request=request,
            user=user,
            via=via,
            action="triage.operating_point.sign_off",
            target_type="operating_point",
            target=str(point.pk),
            details=after,
        )
        enqueue("triage.retriage_outdated")
    return point


def _access_audit(*, request, user, via: str, action: str, target_type: str, target: str, details: dict) -> None:
    """The platform-wide audit log too, where the access app provides it."""
    try:
        from access.services import audit_record
    except ImportError:
        return
    audit_record(
        action=action, request=request, user=user, via=via, target_type=target_type, target=target, details=details
    )


@job("triage.retriage_pending")
def retriage_pending() -> Counter[str]:
    """Re-triage every study waiting as pending."""
    from .selectors import studies_awaiting_triage

    return triage_studies(studies=studies_awaiting_triage())


def studies_out_of_date() -> QuerySet[Study]:
    """Studies whose triage no longer follows what is in use: unread studies whose
    current result was decided under another operating point or other model versions
    than those now in use, and every study waiting as pending. A study already read
    keeps the result it was read with (the record of what the reader saw)."""
    from .selectors import studies_awaiting_triage

    _state, versions, point = model_state()
    wanted = {v.pk for v in versions}
    point_id = point.pk if point is not None else None
    current = (
        TriageResult.objects.filter(is_current=True, study__read_mark__isnull=True)
        .exclude(category=Category.PENDING)
        .prefetch_related("model_versions")
        .only("pk", "study_id", "operating_point_id")
    )
    stale = [
        r.study_id
        for r in current.iterator(chunk_size=500)
        if r.operating_point_id != point_id or {v.pk for v in r.model_versions.all()} != wanted
    ]
    return (Study.objects.filter(pk__in=stale) | studies_awaiting_triage()).distinct().order_by("pk")


@job("triage.retriage_outdated")
def retriage_outdated() -> Counter[str]:
    """After a sign-off, a model activation or a retirement: decide again every study
    `studies_out_of_date` names, so that one worklist never holds two studies decided
    by different thresholds or by a model taken out of service. A radiologist's
    override stands (`_record` keeps it unless the new result is urgent)."""
    return triage_studies(studies=studies_out_of_date())


# --- the job ------------------------------------------------------------------------------


@job("triage.triage_series", settle=lambda: settings.PRECEDENT_TRIAGE_SETTLE_SECONDS)
def triage_series(*, series_id: int) -> TriageResult | None:
    """Triage the study of a series: what arriving images ask for (the ingest knows
    their series). The worker runs it once the series has settled, not per image.

    Nothing is done when the study's current result already saw exactly the images the
    study has now: the job of another worker process (each holds its own queue), or of
    the study's other series, got there first. New images, a radiologist's finding and a
    model or operating-point change each start a triage of their own; an image deleted
    since the result changes the count, so the next arrival job runs in full."""
    study_id = Series.objects.filter(pk=series_id).values_list("study_id", flat=True).first()
    if study_id is None:
        return None
    current = TriageResult.objects.filter(study_id=study_id, is_current=True).first()
    if current is not None and current.images_seen is not None:
        if (current.images_seen, current.last_instance_id) == _images_state(study_id):
            return current
    return triage_study(study_id=study_id)


def _images_state(study_id: int) -> tuple[int, int | None]:
    """(how many images, the newest image's id): ids only grow, so equal pairs are the
    same set of images unless one was deleted and another stored between two looks."""
    state = Instance.objects.filter(series__study_id=study_id).aggregate(n=Count("id"), last=Max("id"))
    return state["n"], state["last"]


@job("triage.triage_study")
def triage_study(*, study_id: int, recheck: bool = False) -> TriageResult | None:
    """(Re)compute the study's current TriageResult. Idempotent; None if the study is gone."""
    study = Study.objects.filter(pk=study_id).first()
    if study is None:
        return None
    # Before anything is read: the images judged below are these or newer ones.
    images_state = _images_state(study_id)
    qualities = assess_study_images(study, recheck=recheck)
    images = [ImageVerdict(q.assessable, tuple(q.reasons)) for q in qualities]
    findings = [
        RadiologistFinding(pathology, abnormality_class)
        for pathology, abnormality_class in Finding.objects.filter(
            instance__series__study=study, source=Finding.Source.RADIOLOGIST
        )
        .order_by("pk")
        .values_list("pathology", "abnormality_class")
    ]
    state, versions, point = model_state()
    detections = localise_study(study=study)
    classifier = next((v for v in versions if v.kind == TriageModelVersion.Kind.CLASSIFIER), None)
    covered = point is None or point_covers(point, qualities)
    if not covered:
        state = dataclasses.replace(state, uncovered_by=point_tasks(point))
    scores = (
        study_exam_scores(study, point=point, qualities=qualities, classifier=classifier)
        if point is not None and covered
        else None
    )
    decision = decide(
        images=images, findings=findings, rules=urgent_rules(), models=state, scores=scores, detections=detections
    )
    return _record(study, decision, versions, point, images_state)


def _record(
    study: Study,
    decision: Decision,
    versions: list[TriageModelVersion],
    point: OperatingPoint | None,
    images_state: tuple[int, int | None],
) -> TriageResult | None:
    qa_read = qa_read_for(study, decision.category)
    with transaction.atomic():
        # Serialises triage of one study across workers: one current row, no lost update.
        if not Study.objects.select_for_update().filter(pk=study.pk).exists():
            return None
        current = TriageResult.objects.filter(study=study, is_current=True).first()
        seen = {"images_seen": images_state[0], "last_instance_id": images_state[1]}
        if current is not None:
            if current.is_manual and decision.category != Category.URGENT:
                return _saw(current, seen)
            unchanged = (
                current.category == decision.category
                and current.reasons == decision.reasons
                and current.scores == decision.scores
                and current.qa_read == qa_read
                and current.operating_point_id == (point.pk if point else None)
                and {v.pk for v in current.model_versions.all()} == {v.pk for v in versions}
            )
            if unchanged:
                return _saw(current, seen)
            TriageResult.objects.filter(pk=current.pk).update(is_current=False)
        result = TriageResult.objects.create(
            **seen,
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


def _saw(current: TriageResult, seen: dict[str, int | None]) -> TriageResult:
    """The current result stands, now for these images too."""
    if any(getattr(current, name) != value for name, value in seen.items()):
        TriageResult.objects.filter(pk=current.pk).update(**seen)
        for name, value in seen.items():
            setattr(current, name, value)
    return current


@dataclass
class MaskFilesReport:
    """`mask_files_check`: mask rows whose PNG is gone, and PNGs no row has."""

    rows: int = 0
    missing: int = 0
    orphans: int = 0
    orphans_young: int = 0
    orphans_removed: int = 0

    @property
    def consistent(self) -> bool:
        return not self.missing and self.orphans_removed == self.orphans


def mask_files_check(*, fix: bool = False, grace_seconds: float = 3600) -> MaskFilesReport:
    """The segmentation masks under PRECEDENT_HOME/masks/triage against their rows, one
    model version's folder at a time (`store check` runs it). A mask is written before
    its row, and removed again when the row cannot be stored, so an orphan is what a
    killed process left: with `fix`, removed once older than `grace_seconds`."""
    from .localisation import MASKS_DIR  # lazily, as everywhere here

    home = Path(settings.PRECEDENT_HOME)
    report = MaskFilesReport()
    cutoff = time.time() - grace_seconds
    root = home / MASKS_DIR
    on_disk = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    with_rows = TriageModelVersion.objects.filter(masks__isnull=False).distinct().values_list("name", flat=True)
    names = on_disk | set(with_rows)
    for name in sorted(names):
        rows = set(SegmentationMask.objects.filter(model_version__name=name).values_list("mask_path", flat=True))
        report.rows += len(rows)
        files = {str(p.relative_to(home)): p for p in (root / name).rglob("*.png")}
        report.missing += len(rows - files.keys())
        for relative in sorted(files.keys() - rows):
            report.orphans += 1
            path = files[relative]
            try:
                young = path.stat().st_mtime > cutoff
            except FileNotFoundError:
                continue
            if young:
                report.orphans_young += 1
            elif fix and not SegmentationMask.objects.filter(mask_path=relative).exists():
                path.unlink(missing_ok=True)
                report.orphans_removed += 1
                with contextlib.suppress(OSError):  # the image's other masks are still there
                    path.parent.rmdir()
    return report


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


# --- localisation: detector and segmenter (implemented in triage/localisation.py) ------------
# Thin entry points under the shared names; the module is imported on first use, so a
# process that only serves the worklist never imports torch.


def train_detector(**kwargs: Any) -> TriageModelVersion:
    """Train the FCOS lesion detector on the cohort's finding boxes and register it
    (arguments: see localisation.train_detector, the same as train_classifier's)."""
    from . import localisation

    return localisation.train_detector(**kwargs)


def train_segmenter(**kwargs: Any) -> TriageModelVersion:
    """Train the breast/lesion U-Net on the cohort's weak masks and register it
    (arguments: see localisation.train_segmenter)."""
    from . import localisation

    return localisation.train_segmenter(**kwargs)


def localise_study(*, study: Study) -> list[ModelDetection]:
    """Run the active detector and segmenter on the study's assessable images not run
    yet (rows idempotent per image and model version); the detector's boxes on the study."""
    if not TriageModelVersion.objects.filter(
        kind__in=[TriageModelVersion.Kind.DETECTOR, TriageModelVersion.Kind.SEGMENTER],
        status=TriageModelVersion.Status.ACTIVE,
    ).exists():
        return []
    from . import localisation

    return localisation.localise_study(study=study)


def evaluate_localisation(
    *, instances, out_dir: Path, progress: bool = False, models: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """FROC (0.5/1/2 false marks per image) of the active detector and mean lesion Dice
    of the active segmenter (or of the loaded `models` by kind) against the instances'
    Finding boxes; writes froc.png."""
    from . import localisation

    return localisation.evaluate_localisation(instances=instances, out_dir=out_dir, progress=progress, models=models)
