"""Selectors that read: the study list with its filters, one study, one instance."""

from __future__ import annotations

import datetime as dt
import re

from django.db.models import Count, F, Func, Prefetch, Q, QuerySet

from .models import Finding, Instance, Series, Study

# Undated studies go last whichever way the date sorts (PostgreSQL puts NULLs first in DESC).
SORTS = {
    "date": (F("study_date").desc(nulls_last=True), F("study_time").desc(nulls_last=True), "-id"),
    "-date": (F("study_date").asc(nulls_last=True), F("study_time").asc(nulls_last=True), "id"),
    "arrival": ("-created_at", "-id"),
    "-arrival": ("created_at", "id"),
    "patient": ("patient__name", "patient__patient_id", F("study_date").desc(nulls_last=True)),
    "-patient": ("-patient__name", "-patient__patient_id", F("study_date").desc(nulls_last=True)),
    "accession": ("accession_number", "id"),
    "-accession": ("-accession_number", "-id"),
}
DEFAULT_SORT = "date"


def study_list(
    *,
    q: str = "",
    patient_id: str = "",
    patient_name: str = "",
    accession: str = "",
    modality: str = "",
    date_from: dt.date | None = None,
    date_to: dt.date | None = None,
    cohort: str = "",
    sort: str = DEFAULT_SORT,
) -> QuerySet[Study]:
    """Studies matching the worklist filters, with their patient and instance count.

    `q` searches patient name and ID and accession number at once (the search box);
    the other filters are exact (IDs, modality, cohort) or ranges (dates).
    """
    qs = Study.objects.select_related("patient").annotate(
        instance_count=Count("series__instances", distinct=True),
        lesion_count=Count(
            "series__instances__findings",
            filter=Q(series__instances__findings__pathology__in=["benign", "malignant", "unknown"]),
        ),
    )
    for word in search_words(q):
        qs = qs.filter(
            _name_matches(word) | Q(patient__patient_id__icontains=word) | Q(accession_number__icontains=word)
        )
    if patient_id:
        qs = qs.filter(patient__patient_id=patient_id)
    for word in search_words(patient_name):
        qs = qs.filter(_name_matches(word))
    if accession:
        qs = qs.filter(accession_number=accession)
    qs = filter_modality_dates(qs, modality=modality, date_from=date_from, date_to=date_to)
    if cohort:
        qs = qs.filter(cohorts__name=cohort)
    return qs.order_by(*SORTS.get(sort, SORTS[DEFAULT_SORT]))


def search_words(text: str) -> list[str]:
    """The words of a search: a name is found as the list shows it ("Citizen, Jan"),
    as people type it ("jan citizen") or as DICOM writes it ("Citizen^Jan"); every
    word must match."""
    return [w for w in re.split(r"[\s,^]+", text or "") if w]


def _name_matches(word: str) -> Q:
    # The patient's name, and the name this study's header gave (they differ after a
    # marriage, or when a study was stored under a patient first seen by another name).
    return Q(patient__name__icontains=word) | Q(patient_name__icontains=word)


def filter_modality_dates(
    qs: QuerySet[Study], *, modality: str = "", date_from: dt.date | None = None, date_to: dt.date | None = None
) -> QuerySet[Study]:
    """Studies holding a modality, in a study-date range (shared by list and worklist)."""
    if modality:
        qs = qs.filter(modalities__contains=[modality.upper()])
    if date_from:
        qs = qs.filter(study_date__gte=date_from)
    if date_to:
        qs = qs.filter(study_date__lte=date_to)
    return qs


def study_modalities() -> list[str]:
    """The modalities present in the archive, for filter menus."""
    unnested = Study.objects.annotate(modality=Func(F("modalities"), function="unnest"))
    return list(unnested.values_list("modality", flat=True).distinct().order_by("modality"))


def study_get(*, study_instance_uid: str) -> Study:
    """One study with series, instances and findings; raises Study.DoesNotExist."""
    instances = Instance.objects.prefetch_related(Prefetch("findings", queryset=Finding.objects.order_by("id")))
    series = Series.objects.prefetch_related(Prefetch("instances", queryset=instances))
    return (
        Study.objects.select_related("patient")
        .prefetch_related(Prefetch("series", queryset=series), "cohorts")
        .get(study_instance_uid=study_instance_uid)
    )


def instance_get(*, sop_instance_uid: str) -> Instance:
    """One instance with its series, study, patient and findings; raises Instance.DoesNotExist."""
    return (
        Instance.objects.select_related("series__study__patient")
        .prefetch_related(Prefetch("findings", queryset=Finding.objects.order_by("id")))
        .get(sop_instance_uid=sop_instance_uid)
    )
