"""Triage reads: the worklist in reading order, what changed since the page was drawn,
one study's triage history, and the similar confirmed cases shown as evidence.

Reading order (one rank per category, then arrival, oldest first: a worklist is
first in, first out within a priority):

0. urgent, 1. suspicious — flagged studies first;
2. not assessable for a technical reason (an image a triage task covers, but blank,
   clipped or undecodable) — no evidence it is normal, and a failed image often means
   recalling the patient, best done while they are still in the department;
3. routine, pending (awaiting triage) and studies outside every triage task (a CT, an
   ultrasound, a report: not assessable only in that no task covers them), interleaved
   by arrival — a study no model has scored is read as it would be without triage, so
   with no model active the worklist is exactly the old arrival-order list;
4. likely negative — last, in its own section, never hidden.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.db.models import Case, Count, Exists, F, FilteredRelation, OuterRef, Q, QuerySet, Value, When
from django.db.models.functions import Coalesce
from tqdm.auto import tqdm

from embeddings.selectors import Hit, SearchError, SearchFilters, similar_cases
from studies import dicom
from studies import selectors as study_selectors
from studies.errors import RenderError
from studies.models import Cohort, Finding, Instance, Study
from studies.services import dicom_store

from .models import (
    Category,
    Detection,
    ImageQuality,
    LocalisationRun,
    OperatingPoint,
    TriageModelVersion,
    TriageResult,
)

RANKS: dict[str, int] = {
    Category.URGENT: 0,
    Category.SUSPICIOUS: 1,
    Category.NOT_ASSESSABLE: 2,
    Category.ROUTINE: 3,
    Category.PENDING: 3,
    Category.LIKELY_NEGATIVE: 4,
}
OUTSIDE_TRIAGE = 3  # the rank of a not-assessable study none of whose images a task covers
SECTIONS: dict[int, str] = {
    0: "Urgent",
    1: "Suspicious",
    2: "Not assessable",
    3: "Routine, awaiting or outside triage",
    4: "Likely negative",
}
FLAGGED = (Category.URGENT, Category.SUSPICIOUS)


def worklist(
    *,
    modality: str = "",
    date_from: dt.date | None = None,
    date_to: dt.date | None = None,
    categories: Sequence[str] = (),
    include_read: bool = False,
) -> QuerySet[Study]:
    """Studies in reading order, each annotated with its current triage (category,
    rank, scores, reasons, qa_read, triaged_at) and read mark (read_at, read_by).

    A study not triaged yet reads as pending. Dates filter the study date."""
    qs = (
        Study.objects.select_related("patient")
        .annotate(
            current=FilteredRelation("triage_results", condition=Q(triage_results__is_current=True)),
            category=Coalesce(F("current__category"), Value(Category.PENDING)),
            scores=F("current__scores"),
            reasons=F("current__reasons"),
            qa_read=Coalesce(F("current__qa_read"), Value(False)),
            triaged_at=F("current__created_at"),
            read_at=F("read_mark__read_at"),
            read_by=F("read_mark__user__username"),
        )
        .annotate(rank=_rank())
    )
    if not include_read:
        qs = qs.filter(read_mark__isnull=True)
    qs = study_selectors.filter_modality_dates(qs, modality=modality, date_from=date_from, date_to=date_to)
    if categories:
        qs = qs.filter(category__in=list(categories))
    return qs.order_by("rank", "created_at", "id")


def _rank() -> Case:
    """The reading-order rank of an annotated study (see the module's docstring)."""
    covered = Exists(ImageQuality.objects.filter(instance__series__study=OuterRef("pk")).exclude(task=""))
    ranks = [When(category=c, then=Value(r)) for c, r in RANKS.items() if c != Category.NOT_ASSESSABLE]
    technical = Case(When(covered, then=Value(RANKS[Category.NOT_ASSESSABLE])), default=Value(OUTSIDE_TRIAGE))
    return Case(When(category=Category.NOT_ASSESSABLE, then=technical), *ranks, default=Value(3))


@dataclass(frozen=True)
class Section:
    rank: int
    title: str
    count: int
    qa_read: int  # likely-negative studies marked to be read anyway


def worklist_sections(studies: QuerySet[Study]) -> list[Section]:
    """Every section with its count (zero too), so a section is never silently absent."""
    rows = studies.order_by().values("rank").annotate(n=Count("id"), qa=Count("id", filter=Q(qa_read=True)))
    counts = {row["rank"]: (row["n"], row["qa"]) for row in rows}
    return [Section(rank, title, *counts.get(rank, (0, 0))) for rank, title in SECTIONS.items()]


@dataclass(frozen=True)
class Changes:
    new: int  # studies that arrived since
    flagged: int  # studies that became urgent or suspicious since (new ones included)

    @property
    def any(self) -> bool:
        return bool(self.new or self.flagged)


def worklist_changes(studies: QuerySet[Study], *, since: dt.datetime) -> Changes:
    """What the polling bar announces: changes to the filtered worklist since `since`."""
    counts = studies.order_by().aggregate(
        new=Count("id", filter=Q(created_at__gte=since)),
        flagged=Count("id", filter=Q(triaged_at__gte=since, category__in=FLAGGED)),
    )
    return Changes(new=counts["new"], flagged=counts["flagged"])


@dataclass
class StudyTriage:
    study: Study
    current: TriageResult | None
    history: list[TriageResult]  # newest first, the current one included
    images: list[ImageQuality]


def study_triage(*, study_instance_uid: str) -> StudyTriage:
    """One study's triage: current result, history and per-image quality; raises Study.DoesNotExist."""
    study = Study.objects.select_related("patient", "read_mark__user").get(study_instance_uid=study_instance_uid)
    history = list(
        TriageResult.objects.filter(study=study)
        .select_related("overridden_by", "operating_point")
        .prefetch_related("model_versions")
        .order_by("-created_at", "-id")
    )
    images = list(
        ImageQuality.objects.filter(instance__series__study=study)
        .select_related("instance")
        .order_by("instance__series__series_number", "instance__instance_number", "instance_id")
    )
    current = next((result for result in history if result.is_current), None)
    return StudyTriage(study=study, current=current, history=history, images=images)


EVIDENCE_K = 3
# Asked for more than shown: only hits with a known outcome are evidence.
EVIDENCE_CANDIDATES = 10
# Worst first: the outcome shown for an image is its worst confirmed finding.
CONFIRMED = (Finding.Pathology.MALIGNANT, Finding.Pathology.BENIGN, Finding.Pathology.NORMAL)


@dataclass(frozen=True)
class Evidence:
    hit: Hit
    outcome: str  # malignant, benign or normal
    abnormality_class: str


def evidence_instance(study: Study) -> Instance | None:
    """The image to search with: the study's first mammogram, else its first image a
    triage task could assess."""
    images = Instance.objects.filter(series__study=study, has_pixel_data=True, rows__isnull=False).select_related(
        "series__study"
    )
    order = ("series__series_number", "instance_number", "pk")
    return (
        images.filter(series__modality="MG").order_by(*order).first()
        or images.filter(triage_quality__assessable=True).order_by(*order).first()
    )


def study_evidence(*, study: Study) -> list[Evidence]:
    """The most similar prior cases of other patients with a confirmed outcome, or none
    when search cannot answer (no active encoder, empty index, undecodable query)."""
    instance = evidence_instance(study)
    if instance is None:
        return []
    try:
        # Priors of the same modality: a mammogram's evidence is other mammograms.
        filters = SearchFilters(modality=instance.series.modality)
        results = similar_cases(instance=instance, k=EVIDENCE_CANDIDATES, filters=filters)
    except SearchError:
        return []
    evidence = []
    for hit in results.hits:
        for outcome in CONFIRMED:
            finding = next((f for f in hit.findings if f["pathology"] == outcome), None)
            if finding is not None:
                evidence.append(Evidence(hit, outcome, finding["abnormality_class"]))
                break
    return evidence[:EVIDENCE_K]


def studies_awaiting_triage() -> QuerySet[Study]:
    """Studies with no current result, or one still pending (`manage.py triage --pending`)."""
    decided = TriageResult.objects.filter(study=OuterRef("pk"), is_current=True).exclude(category=Category.PENDING)
    return Study.objects.exclude(Exists(decided)).order_by("pk")


# --- classifier: labels, decoding and scores of a cohort -----------------------------------

ABNORMAL_PATHOLOGIES = (Finding.Pathology.BENIGN, Finding.Pathology.MALIGNANT, Finding.Pathology.UNKNOWN)


@dataclass
class LabelledImage:
    """One image of a cohort with its ground truth from studies.Finding rows."""

    instance: Instance
    abnormal: int  # 0 or 1
    malignant: int  # 1 malignant, 0 benign, -1 unknown or normal
    boxes: list[tuple[float, float, float, float]]


def labelled_images(*, cohort: Cohort) -> list[LabelledImage]:
    """The cohort's images with pixels and at least one finding (normal or a lesion),
    in study order. An image is abnormal when any finding is benign, malignant or of
    unknown pathology; malignant when one is malignant; benign (0) when its lesions are
    all benign. Images without findings are unlabelled and left out."""
    instances = (
        Instance.objects.filter(series__study__cohorts=cohort, has_pixel_data=True, findings__isnull=False)
        .distinct()
        .select_related("series__study__patient")
        .prefetch_related("findings")
        .order_by("series__study_id", "pk")
    )
    out = []
    for instance in instances:
        findings = list(instance.findings.all())
        pathologies = {f.pathology for f in findings}
        abnormal = int(bool(pathologies & set(ABNORMAL_PATHOLOGIES)))
        if Finding.Pathology.MALIGNANT in pathologies:
            malignant = 1
        elif abnormal and pathologies <= {Finding.Pathology.BENIGN, Finding.Pathology.NORMAL}:
            malignant = 0
        else:
            malignant = -1
        boxes = [(f.x0, f.y0, f.x1, f.y1) for f in findings if f.x0 is not None and f.pathology in ABNORMAL_PATHOLOGIES]
        out.append(LabelledImage(instance, abnormal, malignant, boxes))
    return out


def decode_instance(instance: Instance) -> tuple[np.ndarray, bool]:
    """(pixels of the representative frame, MONOCHROME1?). Raises RenderError."""
    path = dicom_store().path(instance.file_path)
    header = dicom.read_dataset(path, stop_before_pixels=True)
    pixels = dicom.decode_frame(path, header, (instance.number_of_frames + 1) // 2)
    return pixels, instance.photometric_interpretation == "MONOCHROME1"


def score_instances(*, module, instances: Sequence[Instance], progress: bool = False) -> dict[int, tuple[float, float]]:
    """Instance id → (P(abnormal), P(malignant)) for every image that decodes (the
    others are left out: the caller says which are missing)."""
    from .classifier import score_images

    scores: dict[int, tuple[float, float]] = {}
    for instance in tqdm(instances, desc="score", unit="img", disable=not progress):
        try:
            pixels, monochrome1 = decode_instance(instance)
        except (RenderError, OSError, ValueError):
            continue
        p = score_images(module, [pixels], monochrome1=[monochrome1])[0]
        scores[instance.pk] = (float(p[0]), float(p[1]))
    return scores


def detector_image_scores(*, loaded, instances: Sequence[Instance], progress: bool = False) -> dict[int, float]:
    """Instance id → the detector's best box score on it (0 without a box), for every
    image it could run on. Where this version has run on arrival (a LocalisationRun)
    its stored boxes are used, so calibration sees exactly the numbers triage saw;
    other images are run now (nothing stored: a read). Undecodable images are left out."""
    from .exam_score import detector_score
    from .localisation import detect_instance

    ids = [i.pk for i in instances]
    ran = set(
        LocalisationRun.objects.filter(model_version=loaded.version, instance_id__in=ids).values_list(
            "instance_id", flat=True
        )
    )
    stored: dict[int, list[float]] = {}
    for instance_id, score in Detection.objects.filter(model_version=loaded.version, instance_id__in=ran).values_list(
        "instance_id", "score"
    ):
        stored.setdefault(instance_id, []).append(score)
    scores: dict[int, float] = {}
    for instance in tqdm(instances, desc="detect", unit="img", disable=not progress):
        if instance.pk in ran:
            scores[instance.pk] = detector_score(stored.get(instance.pk, []))
            continue
        try:
            boxes = detect_instance(loaded, instance)
        except Exception:  # as on arrival: an image that cannot be decoded is not scored
            continue
        scores[instance.pk] = detector_score(b.score for b in boxes)
    return scores


def study_detector_scores(*, study: Study, version: TriageModelVersion) -> dict[str, float] | None:
    """SOP Instance UID → the best stored box score of `version` on each image of the
    study it has run on (0 for an image it marked nothing on); None when it ran on none."""
    ran = dict(
        LocalisationRun.objects.filter(model_version=version, instance__series__study=study).values_list(
            "instance_id", "instance__sop_instance_uid"
        )
    )
    if not ran:
        return None
    best = {uid: 0.0 for uid in ran.values()}
    for instance_id, score in Detection.objects.filter(model_version=version, instance_id__in=ran).values_list(
        "instance_id", "score"
    ):
        best[ran[instance_id]] = max(best[ran[instance_id]], float(score))
    return best


@dataclass
class ExamScore:
    """One study of a labelled cohort: its labels (any image) and its scores under each
    source the models given could make (`scores`: exam_score.study_scores per source;
    empty when no model could score the exam)."""

    study: Study
    patient_id: str
    abnormal: int
    malignant: int  # 1, 0 (benign lesions only) or -1 (normal or unknown)
    p_abnormal: float | None  # the classifier's, None without one
    p_malignant: float | None
    p_detector: float | None  # the detector's best box, None without one
    # (image, P(abnormal), P(malignant), detector's best box) for every image a model
    # scored: None where that model is not given or did not score the image
    images: list[tuple[LabelledImage, float | None, float | None, float | None]]
    scores: dict[str, dict[str, Any]]

    def score(self, source: str) -> float:
        """The exam score under `source`; KeyError when its models were not given."""
        return float(self.scores[source]["exam"]["score"])

    def image_score(self, source: str, image: tuple[LabelledImage, float | None, float | None, float | None]) -> float:
        """One image's score under `source` (as if it were the exam's only image)."""
        from .exam_score import exam_score

        value = exam_score(source, p_classifier=image[1], p_detector=image[3])
        if value is None:
            raise KeyError(source)
        return value


def cohort_exam_scores(*, cohort: Cohort, classifier=None, detector=None, progress: bool = False) -> list[ExamScore]:
    """Score the labelled images of the cohort with the classifier and/or detector
    given (services.LoadedModel) and combine them per exam (study) the way triage does
    on arrival (classifier.combine, exam_score.study_scores), under every score source
    the models given allow.

    Each model sees the images arrival would give it (services.model_sees: assessable
    by the quality check, and of the model's task), so the caller must have checked the
    cohort's images first (services.assess_cohort_images). Every labelled exam is
    returned; one that no model could score (not assessable, not a mammogram for the
    classifier, nothing decodes) has no `scores` and is counted by the caller as left
    out, as triage leaves it `not_assessable` or `pending`. Raises ValueError when the
    cohort has no labelled image."""
    from .classifier import ImageScore, combine
    from .exam_score import NEEDS, SOURCES, detector_score, study_scores
    from .services import model_sees

    if classifier is None and detector is None:
        raise ValueError("no model to score with: a classifier or a detector must be active")
    labelled = labelled_images(cohort=cohort)
    if not labelled:
        raise ValueError(f"cohort {cohort.name!r} has no labelled images (no studies.Finding rows)")
    verdicts = {q.instance_id: q for q in ImageQuality.objects.filter(instance__in=[i.instance for i in labelled])}

    def seen_by(kind: str, loaded) -> list[Instance]:
        return [i.instance for i in labelled if model_sees(kind, loaded, verdicts.get(i.instance.pk))]

    cls = (
        score_instances(module=classifier.module, instances=seen_by("classifier", classifier), progress=progress)
        if classifier
        else {}
    )
    det = (
        detector_image_scores(loaded=detector, instances=seen_by("detector", detector), progress=progress)
        if detector
        else {}
    )
    by_study: dict[int, list[LabelledImage]] = {}
    for item in labelled:
        by_study.setdefault(item.instance.series.study_id, []).append(item)
    given = {"classifier": classifier is not None, "detector": detector is not None}
    available = [source for source in SOURCES if all(given[kind] for kind in NEEDS[source])]
    exams = []
    for items in by_study.values():
        scored = [item for item in items if item.instance.pk in cls]
        combined = (
            combine(
                [ImageScore(i.instance.sop_instance_uid, i.instance.laterality, *cls[i.instance.pk]) for i in scored]
            )
            if scored
            else None
        )
        detector_images = {
            i.instance.sop_instance_uid: det[i.instance.pk] for i in items if i.instance.pk in det
        } or None
        scores = {
            source: value
            for source in available
            if (value := study_scores(source, classifier=combined, detector_images=detector_images)) is not None
        }
        images = [
            (
                item,
                *(cls.get(item.instance.pk) or (None, None)),
                det.get(item.instance.pk),
            )
            for item in items
            if item.instance.pk in cls or item.instance.pk in det
        ]
        labels_malignant = [item.malignant for item in items]
        study = items[0].instance.series.study
        exams.append(
            ExamScore(
                study=study,
                patient_id=study.patient.patient_id,
                abnormal=int(any(item.abnormal for item in items)),
                malignant=1 if 1 in labels_malignant else 0 if 0 in labels_malignant else -1,
                p_abnormal=combined["exam"]["p_abnormal"] if combined else None,
                p_malignant=combined["exam"]["p_malignant"] if combined else None,
                p_detector=round(detector_score(detector_images.values()), 6) if detector_images else None,
                images=images,
                scores=scores,
            )
        )
    return exams


def scored_exams(exams: Sequence[ExamScore], source: str) -> list[ExamScore]:
    """The exams with a score under `source` (the others triage could not score)."""
    return [e for e in exams if source in e.scores]


def operating_points() -> QuerySet[OperatingPoint]:
    """Every operating point, newest first, with its model versions and signer."""
    return OperatingPoint.objects.select_related("signed_off_by", "validation_cohort").prefetch_related(
        "model_versions"
    )


def active_scoring_versions() -> dict[str, TriageModelVersion]:
    """The active classifier and detector by kind (those an exam score can come from)."""
    rows = TriageModelVersion.objects.filter(
        kind__in=[TriageModelVersion.Kind.CLASSIFIER, TriageModelVersion.Kind.DETECTOR],
        status=TriageModelVersion.Status.ACTIVE,
    )
    return {v.kind: v for v in rows}


def signed_off_point(*, active: dict[str, TriageModelVersion] | None = None) -> OperatingPoint | None:
    """The operating point triage uses: the newest signed-off point whose model
    versions are exactly the active versions its score source needs. A point
    calibrated on another classifier or detector version (or on a model no longer
    active) does not apply: its threshold means nothing for the new model's scores."""
    from .exam_score import NEEDS

    active = active_scoring_versions() if active is None else active
    if not active:
        return None
    candidates = (
        OperatingPoint.objects.filter(signed_off_at__isnull=False, model_versions__in=list(active.values()))
        .distinct()
        .prefetch_related("model_versions")
        .order_by("-signed_off_at", "-pk")
    )
    for point in candidates:
        needs = NEEDS.get(point.score_source, ())
        if not all(kind in active for kind in needs):
            continue
        if {v.pk for v in point.model_versions.all()} == {active[kind].pk for kind in needs}:
            return point
    return None


def user_can_sign_off(*, user) -> bool:
    """Staff, superusers and the access app's admin role see and sign off operating points."""
    if not user.is_authenticated:
        return False
    if user.is_staff or user.is_superuser:
        return True
    try:
        from access.selectors import user_is_admin
    except ImportError:
        return False
    return user_is_admin(user=user)
