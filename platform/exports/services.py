"""Services that write: de-identified research exports, AI results stored as DICOM.

A de-identified export is built into an anonymous temporary file under
PRECEDENT_HOME/tmp (unlinked from the start, so nothing is left behind whatever
happens: an error, a client that disconnects mid-download, a killed worker) and
streamed from there.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from django.conf import settings
from django.utils import timezone

from studies.models import Instance, Study
from studies.services import dicom_store

from . import ai_dicom
from .deid import Deidentifier, burned_in_annotation

log = logging.getLogger(__name__)


class ExportError(Exception):
    """An export that cannot be made, with a one-line reason and the HTTP status."""

    http_status = 400

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ExportNotFound(ExportError):
    http_status = 404


class ExportRefused(ExportError):
    http_status = 400


class NoModelResults(ExportError):
    http_status = 409


# --- de-identified export ---------------------------------------------------------------

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("study_instance_uid", "series_instance_uid", "modality", "instances", "excluded_burned_in")


def export_instances(
    *, study_instance_uids: Sequence[str] = (), sop_instance_uids: Sequence[str] = (), limit: int | None = None
) -> list[Instance]:
    """The instances a selection names, in study/series/instance order.

    Raises ExportNotFound naming the unknown UIDs, and ExportRefused when the selection
    is empty or over `limit` (default PRECEDENT_EXPORT_MAX_INSTANCES)."""
    limit = settings.PRECEDENT_EXPORT_MAX_INSTANCES if limit is None else limit
    study_uids, sop_uids = list(dict.fromkeys(study_instance_uids)), list(dict.fromkeys(sop_instance_uids))
    if not study_uids and not sop_uids:
        raise ExportRefused("nothing selected: give study_instance_uids or sop_instance_uids")
    queryset = Instance.objects.none()
    if study_uids:
        studies = Study.objects.filter(study_instance_uid__in=study_uids)
        known = set(studies.values_list("study_instance_uid", flat=True))
        _raise_unknown("StudyInstanceUID", study_uids, known)
        queryset = queryset | Instance.objects.filter(series__study__study_instance_uid__in=study_uids)
    if sop_uids:
        known = set(Instance.objects.filter(sop_instance_uid__in=sop_uids).values_list("sop_instance_uid", flat=True))
        _raise_unknown("SOPInstanceUID", sop_uids, known)
        queryset = queryset | Instance.objects.filter(sop_instance_uid__in=sop_uids)
    count = queryset.count()
    if count > limit:
        raise ExportRefused(
            f"the selection holds {count} instances, over the export limit of {limit}"
            " (PRECEDENT_EXPORT_MAX_INSTANCES): export fewer studies at a time"
        )
    if count == 0:
        raise ExportRefused("the selected studies hold no instances")
    return list(
        queryset.select_related("series__study").order_by("series__study_id", "series_id", "instance_number", "id")
    )


def _raise_unknown(name: str, asked: list[str], known: set[str]) -> None:
    missing = [uid for uid in asked if uid not in known]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ExportNotFound(f"no instance data for {name} {shown}")


@dataclass
class DeidExport:
    """A finished export: `file` is an open, already unlinked temporary file holding the
    zip (closing it frees the space), positioned at its start."""

    file: BinaryIO
    filename: str
    size: int
    instances: int
    studies: int
    series: int
    excluded_burned_in: int
    counts: dict[str, int] = field(default_factory=dict)


def deid_export_build(*, instances: Sequence[Instance], deidentifier: Deidentifier | None = None) -> DeidExport:
    """A zip of the instances de-identified per PS3.15 basic profile, with UIDs remapped
    consistently across the whole export: <study>/<series>/<instance>.dcm with new UIDs,
    plus manifest.csv (new UIDs and counts only; the original UIDs are never written).

    Instances whose Burned In Annotation is YES are left out and counted. Raises
    ExportRefused when nothing is left to export."""
    deid = deidentifier or Deidentifier()
    store = dicom_store()
    tmp_dir = Path(settings.PRECEDENT_HOME) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    handle = tempfile.TemporaryFile(dir=tmp_dir, prefix="deid-export-", suffix=".zip")
    try:
        per_series: dict[tuple[str, str, str], Counter] = {}
        written = excluded = 0
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for instance in instances:
                ds = pydicom.dcmread(store.path(instance.file_path))
                key = (
                    deid.uid(instance.series.study.study_instance_uid),
                    deid.uid(instance.series.series_instance_uid),
                    instance.series.modality,
                )
                counter = per_series.setdefault(key, Counter())
                if burned_in_annotation(ds):
                    counter["excluded"] += 1
                    excluded += 1
                    continue
                deid.deidentify(ds)
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                name = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
                archive.writestr(name, buffer.getvalue())
                counter["instances"] += 1
                written += 1
            if written == 0:
                raise ExportRefused(
                    f"nothing to export: all {excluded} selected instances have burned-in annotation"
                    " (Burned In Annotation YES), which header de-identification cannot remove"
                )
            archive.writestr(MANIFEST_NAME, _manifest(per_series))
        size = handle.tell()
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    return DeidExport(
        file=handle,
        filename=f"precedent-deid-{stamp}.zip",
        size=size,
        instances=written,
        studies=len({study for study, _series, _modality in per_series}),
        series=len(per_series),
        excluded_burned_in=excluded,
    )


def _manifest(per_series: dict[tuple[str, str, str], Counter]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for (study, series, modality), counter in per_series.items():
        writer.writerow([study, series, modality, counter["instances"], counter["excluded"]])
    return out.getvalue()


# --- AI results as DICOM SR / SEG ---------------------------------------------------------


@dataclass
class StoredAiResult:
    kind: str  # "sr" | "seg"
    model_version: object  # triage.models.TriageModelVersion
    instance: Instance  # the stored SR or SEG
    created: bool


def ai_results_store(*, sop_instance_uid: str, kinds: Sequence[str] = ("sr", "seg")) -> list[StoredAiResult]:
    """Store the image's detections (latest detector version that has any) as a DICOM SR
    and its masks (latest segmenter version) as a DICOM SEG, through the ingest service,
    so they are served like any instance (WADO-RS, file download).

    Idempotent per (source instance, model version, kind): a second call returns what
    the first stored. Serialised per source image by an advisory lock, so two racing
    calls cannot both store. Raises ExportNotFound (unknown UID), NoModelResults (409:
    not an image, or no model output) and ExportError (422: cannot be encoded)."""
    from django.db import connection, transaction

    from triage.models import Detection, SegmentationMask

    from .models import AiDicomResult

    source = Instance.objects.select_related("series__study").filter(sop_instance_uid=sop_instance_uid).first()
    if source is None:
        raise ExportNotFound(f"no instance with SOPInstanceUID {sop_instance_uid}")
    if not source.has_pixel_data or ai_dicom.is_ai_dicom(source.sop_class_uid):
        raise NoModelResults(f"{source.sop_class_name} is not an image: models do not run on it")
    detections = Detection.objects.filter(instance=source).select_related("model_version")
    masks = SegmentationMask.objects.filter(instance=source).select_related("model_version")
    latest_detector = _latest_version(detections) if "sr" in kinds else None
    latest_segmenter = _latest_version(masks) if "seg" in kinds else None
    if latest_detector is None and latest_segmenter is None:
        raise NoModelResults(
            f"instance {sop_instance_uid} has no model results (detections or masks) yet: triage it with an active"
            " detector or segmenter first"
        )
    results: list[StoredAiResult] = []
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", [f"ai-dicom:{sop_instance_uid}"])
        source_ds = None
        for kind, version, rows in (
            (AiDicomResult.Kind.SR, latest_detector, detections),
            (AiDicomResult.Kind.SEG, latest_segmenter, masks),
        ):
            if version is None:
                continue
            existing = (
                AiDicomResult.objects.select_related("instance__series__study")
                .filter(source=source, model_version=version, kind=kind)
                .first()
            )
            if existing is not None:
                results.append(StoredAiResult(str(kind), version, existing.instance, created=False))
                continue
            if source_ds is None:
                source_ds = pydicom.dcmread(dicom_store().path(source.file_path))
            dataset = _build(kind, source_ds, version, [row for row in rows if row.model_version_id == version.pk])
            stored = _ingest(dataset, name=f"{kind}-{sop_instance_uid}.dcm")
            AiDicomResult.objects.create(source=source, model_version=version, kind=kind, instance=stored)
            results.append(StoredAiResult(str(kind), version, stored, created=True))
    return results


def _latest_version(rows) -> object | None:
    row = rows.order_by("-model_version__created_at", "-model_version_id").first()
    return row.model_version if row is not None else None


def _algorithm(version, family: str) -> ai_dicom.Algorithm:
    return ai_dicom.Algorithm(name=version.name, family=family, software_version=version.sha256[:16] or str(version.pk))


def _build(kind: str, source_ds: pydicom.Dataset, version, rows: list) -> pydicom.Dataset:
    try:
        if kind == "sr":
            boxes = [ai_dicom.Box(r.label, r.score, r.x0, r.y0, r.x1, r.y1) for r in rows]
            return ai_dicom.detections_to_sr(source_ds, boxes, algorithm=_algorithm(version, "detector"))
        masks = [ai_dicom.Mask(r.label, _read_mask(r.mask_path)) for r in rows]
        return ai_dicom.masks_to_seg(source_ds, masks, algorithm=_algorithm(version, "segmenter"))
    except (ai_dicom.AiDicomError, ValueError, OSError) as exc:
        error = ExportError(f"cannot encode the {kind.upper()}: {exc}")
        error.http_status = 422
        raise error from exc


def _read_mask(mask_path: str):
    import numpy as np
    from PIL import Image

    with Image.open(Path(settings.PRECEDENT_HOME) / mask_path) as image:
        return np.asarray(image.convert("L")) > 127


def _ingest(dataset: pydicom.Dataset, *, name: str) -> Instance:
    from studies.services import instance_ingest

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    result = instance_ingest(source=buffer, name=name)
    if not result.ok or result.instance is None:
        error = ExportError(f"ingest refused the generated {name}: {result.reason}")
        error.http_status = 422
        raise error
    return Instance.objects.select_related("series__study").get(pk=result.instance.pk)
