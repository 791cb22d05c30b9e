"""Triage reads: the worklist in reading order, what changed since the page was drawn,
one study's triage history, and the similar confirmed cases shown as evidence.

Reading order (one rank per category, then arrival, oldest first: a worklist is
first in, first out within a priority):

0. urgent, 1. suspicious — flagged studies first;
2. not assessable — no evidence it is normal, and a technically failed image often
   means recalling the patient, best done while they are still in the department;
3. routine, and pending (awaiting triage) interleaved with it by arrival — a study
   no model has scored is read as it would be without triage, so with no model
   active the worklist is exactly the old arrival-order list;
4. likely negative — last, in its own section, never hidden.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from django.db.models import Case, Count, Exists, F, FilteredRelation, OuterRef, Q, QuerySet, Value, When
from django.db.models.functions import Coalesce

from embeddings.selectors import Hit, SearchError, similar_cases
from studies import selectors as study_selectors
from studies.models import Finding, Instance, Study

from .models import Category, ImageQuality, TriageResult

RANKS: dict[str, int] = {
    Category.URGENT: 0,
    Category.SUSPICIOUS: 1,
    Category.NOT_ASSESSABLE: 2,
    Category.ROUTINE: 3,
    Category.PENDING: 3,
    Category.LIKELY_NEGATIVE: 4,
}
SECTIONS: dict[int, str] = {
    0: "Urgent",
    1: "Suspicious",
    2: "Not assessable",
    3: "Routine and awaiting triage",
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
        .annotate(rank=Case(*(When(category=c, then=Value(r)) for c, r in RANKS.items()), default=Value(3)))
    )
    if not include_read:
        qs = qs.filter(read_mark__isnull=True)
    qs = study_selectors.filter_modality_dates(qs, modality=modality, date_from=date_from, date_to=date_to)
    if categories:
        qs = qs.filter(category__in=list(categories))
    return qs.order_by("rank", "created_at", "id")


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
        results = similar_cases(instance=instance, k=EVIDENCE_CANDIDATES)
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
