"""Services that write: ingest, render cache, findings, cohorts.

Every ingest path (browser upload, REST, `manage.py ingest`, dataset importers and
later DICOMweb and C-STORE) calls `instance_ingest`, so they all store, deduplicate and
reject the same way.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Func, Value

from . import dicom
from .dicom import DicomHeader, Window
from .errors import IngestError, InstanceConflict
from .models import Cohort, CohortMembership, Finding, Instance, Patient, Series, Study
from .signals import instance_stored
from .storage import DicomStore, Spooled

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass
class IngestResult:
    name: str
    outcome: Outcome
    http_status: int
    reason: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    instance: Instance | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.outcome != Outcome.REJECTED

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"file": self.name, "status": self.http_status, "outcome": str(self.outcome)}
        if self.ok:
            data.update(
                sop_instance_uid=self.sop_instance_uid,
                series_instance_uid=self.series_instance_uid,
                study_instance_uid=self.study_instance_uid,
            )
        else:
            data["error"] = self.reason
        return data


def dicom_store() -> DicomStore:
    return DicomStore(settings.PRECEDENT_HOME, fsync=settings.PRECEDENT_FSYNC)


def instance_ingest(*, source: BinaryIO | Path, name: str = "") -> IngestResult:
    """Store one DICOM file, or say in one line why not. Never raises for bad input.

    Idempotent by SOPInstanceUID: the same bytes again are a duplicate; other bytes
    under a stored SOPInstanceUID are rejected (409). The file and its rows appear
    together or not at all, also when two requests race with the same instance: both
    serialise on a PostgreSQL advisory lock keyed by the SOPInstanceUID, held by the
    transaction that writes the rows, so a file is only ever placed or removed by the
    one request that holds it.
    """
    store = dicom_store()
    name = name or (source.name if isinstance(source, Path) else "")
    try:
        spooled = store.spool(source, max_bytes=settings.PRECEDENT_MAX_UPLOAD_BYTES)
    except IngestError as exc:
        return _rejected(name, exc)
    try:
        _ds, header = dicom.read_header(spooled.path)
        outcome, instance = _store(store, spooled, header)
    except IngestError as exc:
        return _rejected(name, exc)
    finally:
        spooled.discard()
    log.debug("%s %s from %s", outcome, header.sop_instance_uid, name)
    if outcome == Outcome.STORED:
        # Immediately when not in an outer transaction; otherwise once that commits.
        transaction.on_commit(lambda: instance_stored.send(sender=Instance, instance=instance))
    return _result(name, outcome, 201 if outcome == Outcome.STORED else 200, instance, header)


def _store(store: DicomStore, spooled: Spooled, header: DicomHeader) -> tuple[Outcome, Instance]:
    """Place the file and insert its row in one transaction, under the SOP UID's lock.

    The common case (an instance of a series already stored) costs three round trips:
    lock, INSERT … SELECT … ON CONFLICT DO NOTHING, COMMIT. Only when that inserts
    nothing do we look for an existing row (duplicate or conflict) or create the
    patient, study and series first.
    """
    created = False
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [header.sop_instance_uid])
            relative, created = store.commit(spooled)
            try:
                outcome, instance = _insert_or_find(header, relative, spooled)
                if outcome == Outcome.DUPLICATE and created:
                    store.remove(relative)  # the same dataset under another File Meta: keep the first copy
                return outcome, instance
            except BaseException:
                # Still inside the transaction, so still holding the lock: nobody else
                # can have placed a row on this file.
                if created:
                    store.remove(relative)
                created = False
                raise
    except IngestError:
        raise
    except BaseException:
        # The commit itself failed (the lock is gone with the transaction): take the
        # lock again before deciding whether the file we placed is anyone's.
        if created:
            _remove_if_unreferenced(store, relative, header.sop_instance_uid, spooled.sha256)
        raise


def _insert_or_find(header: DicomHeader, relative: str, spooled: Spooled) -> tuple[Outcome, Instance]:
    instance = _insert_instance(header, relative, spooled)
    if instance is not None:
        return Outcome.STORED, instance
    existing = Instance.objects.filter(sop_instance_uid=header.sop_instance_uid).first()
    if existing is not None:
        if not _same_content(existing, spooled):
            raise InstanceConflict(
                f"SOPInstanceUID {header.sop_instance_uid} is already stored with different content"
                f" (stored: {existing.transfer_syntax_name}, {existing.size} bytes;"
                f" this file: {header.transfer_syntax_name}, {spooled.size} bytes)"
            )
        return Outcome.DUPLICATE, existing
    _create_series(header)
    instance = _insert_instance(header, relative, spooled)
    assert instance is not None, "the series was just created under this transaction"
    return Outcome.STORED, instance


def _same_content(existing: Instance, spooled: Spooled) -> bool:
    """The same instance again: the same file, or the same dataset under another
    route's File Meta (a C-STORE after an upload, a re-export by a workstation)."""
    if existing.sha256 == spooled.sha256:
        return True
    return bool(existing.dataset_sha256) and existing.dataset_sha256 == spooled.dataset_sha256


def _remove_if_unreferenced(store: DicomStore, relative: str, sop_instance_uid: str, sha256: str) -> None:
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [sop_instance_uid])
        if not Instance.objects.filter(sha256=sha256).exists():
            store.remove(relative)


def _rejected(name: str, exc: IngestError) -> IngestResult:
    return IngestResult(name=name, outcome=Outcome.REJECTED, http_status=exc.http_status, reason=exc.reason)


def _result(name: str, outcome: Outcome, status: int, instance: Instance, header: DicomHeader) -> IngestResult:
    return IngestResult(
        name=name,
        outcome=outcome,
        http_status=status,
        sop_instance_uid=header.sop_instance_uid,
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid,
        instance=instance,
    )


def _instance_fields(h: DicomHeader, relative: str, sha256: str, size: int, dataset_sha256: str) -> dict[str, Any]:
    return {
        "sop_instance_uid": h.sop_instance_uid,
        "sop_class_uid": h.sop_class_uid,
        "instance_number": h.instance_number,
        "laterality": h.laterality,
        "view_position": h.view_position,
        "rows": h.rows,
        "columns": h.columns,
        "number_of_frames": h.number_of_frames,
        "samples_per_pixel": h.samples_per_pixel,
        "bits_allocated": h.bits_allocated,
        "bits_stored": h.bits_stored,
        "photometric_interpretation": h.photometric_interpretation,
        "transfer_syntax_uid": h.transfer_syntax_uid,
        "has_pixel_data": h.has_pixel_data,
        "file_path": relative,
        "sha256": sha256,
        "dataset_sha256": dataset_sha256,
        "size": size,
    }


def _insert_instance(h: DicomHeader, relative: str, spooled: Spooled) -> Instance | None:
    """INSERT the instance into its series found by UID, in one statement.

    Returns None when nothing was inserted: the SOP UID is already stored, or the
    series does not exist yet. Raw SQL because the ORM's get-then-create chain costs
    five round trips per instance, which measured as most of the ingest time.
    """
    fields = _instance_fields(h, relative, spooled.sha256, spooled.size, spooled.dataset_sha256)
    sql = _insert_instance_sql(tuple(fields))
    with connection.cursor() as cursor:
        cursor.execute(sql, [*fields.values(), h.series_instance_uid])
        row = cursor.fetchone()
    if row is None:
        return None
    instance = Instance(id=row[0], series_id=row[1], created_at=row[2], **fields)
    instance._state.adding = False
    return instance


@functools.cache
def _insert_instance_sql(names: tuple[str, ...]) -> str:
    meta = Instance._meta
    columns = ", ".join(f'"{meta.get_field(name).column}"' for name in names)
    placeholders = ", ".join(["%s"] * len(names))
    return (
        f'INSERT INTO "{meta.db_table}" ({columns}, "series_id", "created_at") '
        f"SELECT {placeholders}, s.id, now() "
        f'FROM "{Series._meta.db_table}" s WHERE s.series_instance_uid = %s '
        f'ON CONFLICT ("{meta.get_field("sop_instance_uid").column}") DO NOTHING '
        "RETURNING id, series_id, created_at"
    )


def _create_series(h: DicomHeader) -> Series:
    """The patient, study and series of a new series (each may exist already)."""
    patient, _ = Patient.objects.get_or_create(
        patient_id=h.patient_id,
        issuer_of_patient_id=h.issuer_of_patient_id,
        defaults={"name": h.patient_name, "sex": h.patient_sex, "birth_date": h.patient_birth_date},
    )
    study, _ = Study.objects.get_or_create(
        study_instance_uid=h.study_instance_uid,
        defaults={
            "patient": patient,
            "accession_number": h.accession_number,
            "study_id": h.study_id,
            "study_date": h.study_date,
            "study_time": h.study_time,
            "description": h.study_description,
            "referring_physician": h.referring_physician,
            "institution_name": h.institution_name,
            "patient_name": h.patient_name,
            "patient_sex": h.patient_sex,
            "patient_birth_date": h.patient_birth_date,
        },
    )
    series, _ = Series.objects.get_or_create(
        series_instance_uid=h.series_instance_uid,
        defaults={
            "study": study,
            "modality": h.modality,
            "series_number": h.series_number,
            "description": h.series_description,
            "body_part": h.body_part,
            "manufacturer": h.manufacturer,
            "manufacturer_model": h.manufacturer_model,
        },
    )
    if h.modality and h.modality not in study.modalities:
        # array_append in SQL, guarded, so two racing series cannot drop each other's modality.
        Study.objects.filter(pk=study.pk).exclude(modalities__contains=[h.modality]).update(
            modalities=Func(F("modalities"), Value(h.modality), function="array_append")
        )
    return series


# --- rendering --------------------------------------------------------------------------

THUMBNAIL_SIZE = 256


@dataclass(frozen=True)
class RenderRequest:
    frame: int = 1
    preset: str = "default"
    window: Window | None = None
    max_size: int | None = None

    def cache_name(self, sha256: str) -> str:
        voi = f"w{self.window.center:g}_{self.window.width:g}" if self.window else self.preset
        return f"{sha256}-f{self.frame}-{voi}-s{self.max_size or 0}.png"


def instance_render_png(*, instance: Instance, request: RenderRequest) -> Path:
    """PNG of one frame, rendered once and cached under PRECEDENT_HOME/cache/render.

    The cache key starts with the file's SHA-256, so a cached image can never belong to
    other pixel data. Raises RenderError when the pixels cannot be decoded.
    """
    cache = Path(settings.PRECEDENT_HOME) / "cache" / "render" / instance.sha256[:2]
    target = cache / request.cache_name(instance.sha256)
    if target.exists():
        return target
    path = dicom_store().path(instance.file_path)
    header, pixels = _decoded_frame(str(path), instance.sha256, request.frame)
    rendered = dicom.render(pixels, header, window=request.window, preset=request.preset, max_size=request.max_size)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
    with os.fdopen(fd, "wb") as out:
        out.write(dicom.encode_png(rendered))
    os.replace(tmp, target)
    return target


@functools.lru_cache(maxsize=4)
def _decoded_frame(path: str, sha256: str, frame: int):  # noqa: ARG001 - sha256 keys the cache
    """Decoding costs more than windowing (100 ms to 0.5 s for compressed films), so
    the last few decoded frames stay in memory while a user drags the window."""
    header = dicom.read_dataset(path, stop_before_pixels=True)
    return header, dicom.decode_frame(path, header, frame)


# --- findings and cohorts ---------------------------------------------------------------


def cohort_add_studies(*, name: str, studies: list[Study], description: str = "") -> Cohort:
    cohort, _ = Cohort.objects.get_or_create(name=name, defaults={"description": description})
    CohortMembership.objects.bulk_create(
        [CohortMembership(cohort=cohort, study=study) for study in studies], ignore_conflicts=True
    )
    return cohort


def finding_upsert(*, instance: Instance, source_key: str, **fields: Any) -> tuple[Finding, bool]:
    """Create or update the finding a dataset row describes (re-imports stay single).

    Returns the finding and whether it was created."""
    return Finding.objects.update_or_create(instance=instance, source_key=source_key, defaults=fields)


def cohort_union(*, name: str, sources: list[str], exclude_patients_of: list[str] = ()) -> Cohort:
    """A new cohort holding every study of the `sources`, less every patient of the
    `exclude_patients_of` cohorts: e.g. self-supervised pretraining on all the images
    the platform holds except the patients kept apart for validation and test.

    Raises ValueError (one line) for an unknown cohort, a name already taken (an
    evaluation cohort must not grow by accident) or a union with no study left."""
    known = set(Cohort.objects.filter(name__in=[*sources, *exclude_patients_of]).values_list("name", flat=True))
    missing = [n for n in (*sources, *exclude_patients_of) if n not in known]
    if missing:
        raise ValueError(f"no cohort named {missing[0]!r}")
    kept_apart = Study.objects.filter(cohorts__name__in=exclude_patients_of).values("patient_id")
    studies = list(
        Study.objects.filter(cohorts__name__in=sources).exclude(patient_id__in=kept_apart).distinct().order_by("pk")
    )
    if not studies:
        raise ValueError("no study is left in the union")
    description = " + ".join(sources) + (
        f", without the patients of {', '.join(exclude_patients_of)}" if exclude_patients_of else ""
    )
    try:
        with transaction.atomic():
            # create, not get_or_create: a cohort of that name made meanwhile is refused too.
            cohort = Cohort.objects.create(name=name, description=description)
            CohortMembership.objects.bulk_create([CohortMembership(cohort=cohort, study=study) for study in studies])
    except IntegrityError:
        raise ValueError(f"cohort {name!r} exists already: pick a new name") from None
    return cohort


def cohort_split(*, source: str, parts: dict[str, float], seed: int = 0) -> dict[str, Cohort]:
    """Split a cohort into new cohorts by patient, never putting one patient in two.

    Patients are shuffled with `seed` within two strata (any abnormal finding or not),
    so each part gets its share of abnormal patients; `parts` maps new cohort names to
    fractions that sum to 1. Re-running with the same arguments gives the same split.
    """
    import random

    if abs(sum(parts.values()) - 1.0) > 1e-6 or any(f <= 0 for f in parts.values()):
        raise ValueError("fractions must be positive and sum to 1")
    cohort = Cohort.objects.get(name=source)
    studies = list(cohort.studies.select_related("patient"))
    abnormal_patients = set(
        Finding.objects.filter(instance__series__study__in=studies)
        .exclude(pathology=Finding.Pathology.NORMAL)
        .values_list("instance__series__study__patient_id", flat=True)
    )
    by_patient: dict[int, list[Study]] = {}
    for study in studies:
        by_patient.setdefault(study.patient_id, []).append(study)

    rng = random.Random(seed)
    assignment: dict[str, list[Study]] = {name: [] for name in parts}
    for stratum in (
        sorted(p for p in by_patient if p in abnormal_patients),
        sorted(p for p in by_patient if p not in abnormal_patients),
    ):
        rng.shuffle(stratum)
        start = 0
        names = list(parts)
        for i, name in enumerate(names):
            end = len(stratum) if i == len(names) - 1 else start + round(parts[name] * len(stratum))
            for patient in stratum[start:end]:
                assignment[name].extend(by_patient[patient])
            start = end
    with transaction.atomic():
        return {
            name: cohort_add_studies(
                name=name, studies=chosen, description=f"{parts[name]:.0%} of {source} by patient, seed {seed}"
            )
            for name, chosen in assignment.items()
        }
