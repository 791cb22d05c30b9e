"""Selectors for DICOMweb: QIDO-RS searches over the study, series and instance rows,
and the instances a WADO-RS URL names.

The rows hold what QIDO-RS needs (patient, study, series and instance attributes, as
ingest wrote them), so a search never opens a DICOM file. Matching follows PS3.4
C.2.2.2 as parsed by `dicomweb.parse_qido`; results are ordered by arrival (row id),
which keeps limit/offset paging stable while new instances arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Model, Q, QuerySet

from studies.models import Instance, Series, Study

from .dicomweb import (
    ATTRIBUTES,
    Level,
    Match,
    QidoQuery,
    format_da,
    format_tm,
    json_element,
    person_name,
    tag_key,
    wildcard_regex,
)

# Where each attribute lives, from the row of its own level.
FIELDS: dict[str, str] = {
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "ModalitiesInStudy": "modalities",
    "ReferringPhysicianName": "referring_physician",
    "StudyDescription": "description",
    "InstitutionName": "institution_name",
    "PatientName": "patient_name",
    "PatientID": "patient__patient_id",
    "IssuerOfPatientID": "patient__issuer_of_patient_id",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "StudyInstanceUID": "study_instance_uid",
    "StudyID": "study_id",
    "Modality": "modality",
    "SeriesDescription": "description",
    "SeriesInstanceUID": "series_instance_uid",
    "SeriesNumber": "series_number",
    "BodyPartExamined": "body_part",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model",
    "SOPClassUID": "sop_class_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "InstanceNumber": "instance_number",
    "ViewPosition": "view_position",
    "Rows": "rows",
    "Columns": "columns",
    "NumberOfFrames": "number_of_frames",
    "SamplesPerPixel": "samples_per_pixel",
    "BitsAllocated": "bits_allocated",
    "BitsStored": "bits_stored",
    "PhotometricInterpretation": "photometric_interpretation",
    "AvailableTransferSyntaxUID": "transfer_syntax_uid",
}
# Attributes of the image pixel module, empty for instances without pixel data (the
# row keeps NumberOfFrames = 1 for those, which would claim a frame that is not there).
_PIXEL_KEYWORDS = {"Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored"}
_PIXEL_KEYWORDS |= {"PhotometricInterpretation"}

MODELS: dict[Level, type[Model]] = {Level.STUDY: Study, Level.SERIES: Series, Level.INSTANCE: Instance}
# How to reach a level's row from the row of a deeper level.
_PREFIX = {
    (Level.STUDY, Level.STUDY): "",
    (Level.SERIES, Level.STUDY): "study__",
    (Level.INSTANCE, Level.STUDY): "series__study__",
    (Level.SERIES, Level.SERIES): "",
    (Level.INSTANCE, Level.SERIES): "series__",
    (Level.INSTANCE, Level.INSTANCE): "",
}
_RELATED = {
    Level.STUDY: ("patient",),
    Level.SERIES: ("study__patient",),
    Level.INSTANCE: ("series__study__patient",),
}


@dataclass
class SearchResult:
    """One page of matches in the DICOM JSON model, and whether more matched."""

    datasets: list[dict[str, Any]]
    more: bool


@dataclass(frozen=True)
class Urls:
    """The RetrieveURL of each level, under this service's base URL."""

    base: str

    def study(self, study: str) -> str:
        return f"{self.base}/studies/{study}"

    def series(self, study: str, series: str) -> str:
        return f"{self.study(study)}/series/{series}"

    def instance(self, study: str, series: str, sop: str) -> str:
        return f"{self.series(study, series)}/instances/{sop}"


def qido_search(
    *, query: QidoQuery, urls: Urls, study_instance_uid: str = "", series_instance_uid: str = ""
) -> SearchResult:
    """Rows matching `query` at its level, within the study and series the URL names.

    Returned attributes: the level's required ones (PS3.18 Table 10.6.3-3..5), the
    study's when the URL names no study and the series' when it names no series (as
    PS3.18 asks for searches across studies or series), the matching keys and the
    includefields.
    """
    level = query.level
    qs = MODELS[level].objects.select_related(*_RELATED[level])
    if study_instance_uid:
        qs = qs.filter(**{_path(level, "StudyInstanceUID"): study_instance_uid})
    if series_instance_uid:
        qs = qs.filter(**{_path(level, "SeriesInstanceUID"): series_instance_uid})
    for match in query.matches:
        qs = qs.filter(_condition(level, match))
    rows = list(qs.order_by("id")[query.offset : query.offset + query.limit + 1])
    more = len(rows) > query.limit
    rows = rows[: query.limit]

    levels = [level]
    if level != Level.STUDY and not study_instance_uid:
        levels.append(Level.STUDY)
    if level == Level.INSTANCE and not series_instance_uid:
        levels.append(Level.SERIES)
    keywords = query.returned(levels)
    counts = _counts(level, rows, keywords)
    return SearchResult([_dataset(level, row, keywords, counts, urls) for row in rows], more)


def _path(level: Level, keyword: str) -> str:
    return _PREFIX[(level, ATTRIBUTES[keyword].level)] + FIELDS[keyword]


def _condition(level: Level, match: Match) -> Q:
    """One matching key as a filter on the queried rows (PS3.4 C.2.2.2)."""
    keyword = match.attribute.keyword
    path = _path(level, keyword)
    if keyword == "ModalitiesInStudy":
        return Q(**{f"{path}__overlap": [v.upper() for v in match.values]})
    if match.kind == "list":
        return Q(**{f"{path}__in": match.values})
    if match.kind == "range":
        condition = Q()
        if match.low is not None:
            condition &= Q(**{f"{path}__gte": match.low})
        if match.high is not None:
            condition &= Q(**{f"{path}__lte": match.high})
        return condition
    # Person names match case-insensitively (common practice, and Orthanc's default);
    # other strings literally, as PS3.4 says.
    insensitive = match.attribute.vr == "PN"
    (value,) = match.values
    if match.kind == "wildcard":
        return Q(**{f"{path}__{'iregex' if insensitive else 'regex'}": wildcard_regex(value)})
    return Q(**{f"{path}__{'iexact' if insensitive else 'exact'}": value})


def _counts(level: Level, rows: list[Model], keywords: list[str]) -> dict[str, dict[int, int]]:
    """The NumberOf... attributes asked for, counted for this page's rows only."""
    counts: dict[str, dict[int, int]] = {}
    study_ids = {_study(level, row).pk for row in rows}
    if "NumberOfStudyRelatedSeries" in keywords:
        counts["NumberOfStudyRelatedSeries"] = _grouped(Series.objects, "study_id", study_ids, "id")
    if "NumberOfStudyRelatedInstances" in keywords:
        counts["NumberOfStudyRelatedInstances"] = _grouped(Instance.objects, "series__study_id", study_ids, "id")
    if "NumberOfSeriesRelatedInstances" in keywords and level != Level.STUDY:
        series_ids = {_series(level, row).pk for row in rows}
        counts["NumberOfSeriesRelatedInstances"] = _grouped(Instance.objects, "series_id", series_ids, "id")
    return counts


def _grouped(manager: Any, key: str, ids: Iterable[int], counted: str) -> dict[int, int]:
    rows = manager.filter(**{f"{key}__in": list(ids)}).values(key).annotate(n=Count(counted))
    return {row[key]: row["n"] for row in rows}


def _study(level: Level, row: Any) -> Study:
    return row if level == Level.STUDY else row.study if level == Level.SERIES else row.series.study


def _series(level: Level, row: Any) -> Series:
    return row if level == Level.SERIES else row.series


def _dataset(
    level: Level, row: Any, keywords: list[str], counts: dict[str, dict[int, int]], urls: Urls
) -> dict[str, Any]:
    study = _study(level, row)
    series = _series(level, row) if level != Level.STUDY else None
    owners: dict[Level, Any] = {Level.STUDY: study, Level.SERIES: series, Level.INSTANCE: row}
    out: dict[str, Any] = {}
    for keyword in keywords:
        attribute = ATTRIBUTES.get(keyword)
        if keyword == "RetrieveURL":
            out[tag_key(0x00081190)] = json_element("UR", [_retrieve_url(level, study, series, row, urls)])
        elif keyword == "InstanceAvailability":
            out[tag_key(0x00080056)] = json_element("CS", ["ONLINE"])
        elif keyword in counts:
            owner = study if keyword.startswith("NumberOfStudy") else series
            out[tag_key(attribute.tag)] = json_element("IS", [counts[keyword].get(owner.pk, 0)])
        elif attribute is not None and keyword in FIELDS:
            owner = owners[attribute.level]
            out[tag_key(attribute.tag)] = _element(attribute.vr, keyword, owner)
    return dict(sorted(out.items()))


def _retrieve_url(level: Level, study: Study, series: Series | None, row: Any, urls: Urls) -> str:
    if level == Level.STUDY:
        return urls.study(study.study_instance_uid)
    assert series is not None
    if level == Level.SERIES:
        return urls.series(study.study_instance_uid, series.series_instance_uid)
    return urls.instance(study.study_instance_uid, series.series_instance_uid, row.sop_instance_uid)


def _element(vr: str, keyword: str, owner: Any) -> dict[str, Any]:
    if keyword in _PIXEL_KEYWORDS and not owner.has_pixel_data:
        return json_element(vr, None)
    value: Any = owner
    for name in FIELDS[keyword].split("__"):
        value = getattr(value, name)
    formatters: dict[str, Callable[[Any], list[Any]]] = {
        "PN": lambda v: [person_name(v)],
        "DA": lambda v: [format_da(v)],
        "TM": lambda v: [format_tm(v)],
    }
    if keyword == "ModalitiesInStudy":
        return json_element(vr, sorted(value))
    if vr in formatters:
        return json_element(vr, formatters[vr](value))
    return json_element(vr, [value])


# --- WADO-RS -------------------------------------------------------------------------------


def instances_for(
    *, study_instance_uid: str, series_instance_uid: str = "", sop_instance_uid: str = ""
) -> list[Instance]:
    """The stored instances a WADO-RS URL names, in series and instance order.

    Empty when the URL's UIDs do not name stored objects, or do not nest (a series
    of another study): the caller answers 404.
    """
    qs: QuerySet[Instance] = Instance.objects.select_related("series__study").filter(
        series__study__study_instance_uid=study_instance_uid
    )
    if series_instance_uid:
        qs = qs.filter(series__series_instance_uid=series_instance_uid)
    if sop_instance_uid:
        qs = qs.filter(sop_instance_uid=sop_instance_uid)
    return list(qs.order_by("series__series_number", "series_id", "instance_number", "id"))
