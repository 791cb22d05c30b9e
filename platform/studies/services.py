"""Services that write: ingest, render cache, findings, cohorts.

Every ingest path (browser upload, REST, `manage.py ingest`, dataset importers and
later DICOMweb and C-STORE) calls `instance_ingest`, so they all store, deduplicate and
reject the same way.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Func, Value

from . import dicom, storage
from .dicom import DicomHeader, Window
from .errors import IngestError, InstanceConflict
from .models import Cohort, CohortMembership, Finding, Instance, Patient, Series, Study
from .render_cache import RenderCache
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


# At most this many files share a transaction: its advisory locks (one per
# SOPInstanceUID) and spooled temp files are bounded, and a batch is large enough that
# the commit's WAL flush and the folder syncs are paid once for many files.
INGEST_BATCH = 32

# What to store, and its name. The source is a stream or a path to spool, or a file a
# request handler already spooled as it arrived (studies.uploads; the ingest owns it
# from then on), or the IngestError that receiving it ended with.
IngestItem = tuple[BinaryIO | Path | Spooled | IngestError, str]


@dataclass
class _Received:
    """A file spooled and validated, waiting for its batch's transaction."""

    index: int  # its place among the caller's items
    name: str
    spooled: Spooled
    header: DicomHeader


def instance_ingest(*, source: BinaryIO | Path, name: str = "") -> IngestResult:
    """Store one DICOM file, or say in one line why not. Never raises for bad input.

    Idempotent by SOPInstanceUID: the same bytes again are a duplicate; other bytes
    under a stored SOPInstanceUID are rejected (409). The file and its rows appear
    together or not at all, also when two requests race with the same instance: both
    serialise on a PostgreSQL advisory lock keyed by the SOPInstanceUID, held by the
    transaction that writes the rows, so a file is only ever placed or removed by the
    one request that holds it.
    """
    return instances_ingest([(source, name)])[0]


def instances_ingest(items: Iterable[IngestItem], *, batch_size: int = INGEST_BATCH) -> list[IngestResult]:
    """`instance_ingest` for several files (source, name), one result per item, in order.

    Items are read one after the other (a stream may be the next part of a request
    body), spooled and validated; each run of up to `batch_size` valid files is then
    stored in one transaction: one lock statement, one INSERT, one commit and one round
    of folder syncs for all of them. A file's result does not depend on its batch: a
    conflict or a duplicate is that file's outcome alone. A repeat of a SOPInstanceUID
    earlier in the same batch is decided after the first one is committed, as if it had
    come in the next request. An unexpected error (the database going away) raises:
    the batches before it are stored, the one under way leaves nothing behind.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    store = dicom_store()
    results: list[IngestResult | None] = []
    batch: list[_Received] = []
    try:
        for source, name in items:
            name = name or (source.name if isinstance(source, Path) else "")
            received = _receive(store, source, name, index=len(results))
            if isinstance(received, IngestResult):
                results.append(received)
                continue
            results.append(None)
            batch.append(received)
            if len(batch) >= batch_size:
                _decide(results, _store_batch(store, batch))
                batch = []
        if batch:
            _decide(results, _store_batch(store, batch))
            batch = []
    finally:
        for received in batch:  # an error before its batch was stored
            received.spooled.discard()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _receive(
    store: DicomStore, source: BinaryIO | Path | Spooled | IngestError, name: str, *, index: int
) -> _Received | IngestResult:
    """Spool and validate one file: what its batch will store, or why it is rejected."""
    if isinstance(source, IngestError):
        return _rejected(name, source)
    try:
        if isinstance(source, Spooled):
            spooled = store.unwrap(source, max_bytes=settings.PRECEDENT_MAX_UPLOAD_BYTES)
        else:
            spooled = store.spool(source, max_bytes=settings.PRECEDENT_MAX_UPLOAD_BYTES)
    except IngestError as exc:
        return _rejected(name, exc)
    try:
        _ds, header = dicom.read_header(spooled.path)
    except IngestError as exc:
        spooled.discard()
        return _rejected(name, exc)
    except BaseException:
        spooled.discard()
        raise
    return _Received(index=index, name=name, spooled=spooled, header=header)


def _decide(results: list[IngestResult | None], decided: list[tuple[_Received, IngestResult]]) -> None:
    for received, result in decided:
        results[received.index] = result


def _store_batch(store: DicomStore, batch: list[_Received]) -> list[tuple[_Received, IngestResult]]:
    """Store a batch: every first occurrence of a SOPInstanceUID in one transaction, then
    each repeat on its own (it is then a duplicate of, or a conflict with, the first)."""
    firsts: dict[str, _Received] = {}
    repeats: list[_Received] = []
    for received in batch:
        if received.header.sop_instance_uid in firsts:
            repeats.append(received)
        else:
            firsts[received.header.sop_instance_uid] = received
    decided: list[tuple[_Received, IngestResult]] = []
    try:
        for group in ([*firsts.values()], *([r] for r in repeats)):
            for received, outcome in zip(group, _store(store, group), strict=True):
                decided.append((received, _outcome_result(received, outcome)))
    finally:
        for received in batch:
            received.spooled.discard()
    return decided


def _outcome_result(received: _Received, outcome: tuple[Outcome, Instance] | IngestError) -> IngestResult:
    if isinstance(outcome, IngestError):
        return _rejected(received.name, outcome)
    kind, instance = outcome
    log.debug("%s %s from %s", kind, received.header.sop_instance_uid, received.name)
    if kind == Outcome.STORED:
        # Immediately when not in an outer transaction; otherwise once that commits.
        transaction.on_commit(lambda: instance_stored.send(sender=Instance, instance=instance))
    return _result(received.name, kind, 201 if kind == Outcome.STORED else 200, instance, received.header)


def _store(store: DicomStore, group: list[_Received]) -> list[tuple[Outcome, Instance] | IngestError]:
    """Place the files and insert their rows in one transaction, under their SOP UIDs'
    locks; one outcome per file of `group` (SOP UIDs distinct).

    The common case (instances of series already stored) costs three round trips for
    the whole group: lock, INSERT … SELECT … ON CONFLICT DO NOTHING, COMMIT. Only the
    files that inserted nothing are looked up (duplicate or conflict) or get their
    patient, study and series created first.
    """
    placed: list[tuple[str, bool]] = []
    committing = False
    try:
        with transaction.atomic():
            _lock_instances([r.header.sop_instance_uid for r in group])
            placement = store.place([r.spooled for r in group])
            placed = placement.files
            try:
                outcomes = _insert_or_find(group, [relative for relative, _ in placed])
                for (relative, created), outcome in zip(placed, outcomes, strict=True):
                    if created and (isinstance(outcome, IngestError) or outcome[0] != Outcome.STORED):
                        # A conflict's file, or the same dataset under another File
                        # Meta (a duplicate): keep the first copy only.
                        store.remove(relative)
                # The folder syncs ran beside the INSERT; the new names must be on
                # disk before the rows that point at them commit.
                placement.wait_synced()
            except BaseException:
                # Still inside the transaction, so still holding the locks: nobody
                # else can have placed a row on these files.
                store.remove_created(placed)
                placed = []
                raise
            committing = True
        return outcomes
    except BaseException:
        if committing:
            # The commit itself failed (the locks are gone with the transaction): take
            # them again before deciding whether the files we placed are anyone's.
            for received, (relative, created) in zip(group, placed, strict=True):
                if created:
                    _remove_if_unreferenced(store, relative, received.header.sop_instance_uid, received.spooled.sha256)
        raise


def _lock_instances(sop_instance_uids: list[str]) -> None:
    """Take the transaction's advisory locks on these SOP UIDs, in one statement and in
    the order of their keys, so two batches that share instances cannot deadlock."""
    with connection.cursor() as cursor:
        if len(sop_instance_uids) == 1:  # one file: the plain statement, planned faster
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", sop_instance_uids)
            return
        cursor.execute(
            "SELECT count(pg_advisory_xact_lock(k)) FROM"
            " (SELECT DISTINCT hashtextextended(u, 0) AS k FROM unnest(%s::text[]) AS u ORDER BY k) AS keys",
            [sop_instance_uids],
        )


def _insert_or_find(group: list[_Received], relatives: list[str]) -> list[tuple[Outcome, Instance] | IngestError]:
    rows = _insert_instances(group, relatives)
    outcomes: dict[str, tuple[Outcome, Instance] | IngestError] = {
        uid: (Outcome.STORED, instance) for uid, instance in rows.items()
    }
    missing = [(r, rel) for r, rel in zip(group, relatives, strict=True) if r.header.sop_instance_uid not in rows]
    if missing:
        uids = [r.header.sop_instance_uid for r, _ in missing]
        existing = Instance.objects.in_bulk(uids, field_name="sop_instance_uid")
        new_series: list[tuple[_Received, str]] = []
        for received, relative in missing:
            uid = received.header.sop_instance_uid
            found = existing.get(uid)
            if found is None:
                new_series.append((received, relative))
            elif _same_content(found, received.spooled):
                outcomes[uid] = (Outcome.DUPLICATE, found)
            else:
                outcomes[uid] = InstanceConflict(
                    f"SOPInstanceUID {uid} is already stored with different content"
                    f" (stored: {found.transfer_syntax_name}, {found.size} bytes;"
                    f" this file: {received.header.transfer_syntax_name}, {received.spooled.size} bytes)"
                )
        if new_series:
            created_series: set[str] = set()
            for received, _ in new_series:
                if received.header.series_instance_uid not in created_series:
                    _create_series(received.header)
                    created_series.add(received.header.series_instance_uid)
            rows = _insert_instances([r for r, _ in new_series], [rel for _, rel in new_series])
            assert len(rows) == len(new_series), "their series were just created under this transaction"
            outcomes.update((uid, (Outcome.STORED, instance)) for uid, instance in rows.items())
    return [outcomes[r.header.sop_instance_uid] for r in group]


def _same_content(existing: Instance, spooled: Spooled) -> bool:
    """The same instance again: the same file, or the same dataset under another
    route's File Meta (a C-STORE after an upload, a re-export by a workstation)."""
    if existing.sha256 == spooled.sha256:
        return True
    # Dataset hashes are computed only here, when a stored SOP UID comes back as other
    # file bytes; the stored one is kept on its row for the next time.
    if not existing.dataset_sha256:
        existing.dataset_sha256 = storage.dataset_sha256(dicom_store().path(existing.file_path))
        Instance.objects.filter(pk=existing.pk).update(dataset_sha256=existing.dataset_sha256)
    return existing.dataset_sha256 == spooled.dataset_sha256


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


def _instance_fields(h: DicomHeader, relative: str, sha256: str, size: int) -> dict[str, Any]:
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
        "dataset_sha256": "",  # computed when a duplicate check needs it (_same_content)
        "size": size,
    }


def _insert_instances(group: list[_Received], relatives: list[str]) -> dict[str, Instance]:
    """INSERT the instances into their series found by UID, in one statement.

    Returns the inserted instances by SOP UID; an instance is missing when its SOP UID
    is already stored or its series does not exist yet. Raw SQL because the ORM's
    get-then-create chain costs five round trips per instance, which measured as most
    of the ingest time.
    """
    rows = [
        _instance_fields(r.header, rel, r.spooled.sha256, r.spooled.size)
        for r, rel in zip(group, relatives, strict=True)
    ]
    names = tuple(rows[0])
    params: list[Any] = []
    for received, fields in zip(group, rows, strict=True):
        params.extend(fields.values())
        params.append(received.header.series_instance_uid)
    with connection.cursor() as cursor:
        cursor.execute(_insert_instances_sql(names, len(rows)), params)
        inserted = cursor.fetchall()
    by_uid = {fields["sop_instance_uid"]: fields for fields in rows}
    instances = {}
    for pk, series_id, created_at, uid in inserted:
        instance = Instance(id=pk, series_id=series_id, created_at=created_at, **by_uid[uid])
        instance._state.adding = False
        instances[uid] = instance
    return instances


@functools.cache
def _insert_instances_sql(names: tuple[str, ...], count: int) -> str:
    meta = Instance._meta
    fields = [meta.get_field(name) for name in names]
    columns = ", ".join(f'"{f.column}"' for f in fields)
    # Typed placeholders: a VALUES column of NULLs alone would otherwise be text.
    row = "(" + ", ".join(f"%s::{_sql_type(f)}" for f in fields) + ", %s::text)"
    values = ", ".join([row] * count)
    aliases = ", ".join(f"c{i}" for i in range(len(fields)))
    return (
        f'INSERT INTO "{meta.db_table}" ({columns}, "series_id", "created_at") '
        f"SELECT {aliases}, s.id, now() "
        f"FROM (VALUES {values}) AS v({aliases}, series_uid) "
        f'JOIN "{Series._meta.db_table}" s ON s.series_instance_uid = v.series_uid '
        f'ON CONFLICT ("{meta.get_field("sop_instance_uid").column}") DO NOTHING '
        f'RETURNING id, series_id, created_at, "{meta.get_field("sop_instance_uid").column}"'
    )


def _sql_type(field: Any) -> str:
    """The column's type for a cast: text for character columns (their length is
    checked on assignment, as for any INSERT), the column type otherwise."""
    db_type = field.db_type(connection)
    return "text" if db_type.startswith(("varchar", "char")) else db_type


def _create_series(h: DicomHeader) -> Series:
    """The patient, study and series of a new series (each may exist already)."""
    patient_fields = {"name": h.patient_name, "sex": h.patient_sex, "birth_date": h.patient_birth_date}
    own_patient = None
    if h.patient_id:
        patient, _ = Patient.objects.get_or_create(
            patient_id=h.patient_id, issuer_of_patient_id=h.issuer_of_patient_id, defaults=patient_fields
        )
    else:
        # No PatientID: nothing says that two such studies are one person's, so the
        # study has a patient of its own (the one it has already, if it exists).
        existing = Study.objects.filter(study_instance_uid=h.study_instance_uid).select_related("patient").first()
        if existing is not None:
            patient = existing.patient
        else:
            patient = own_patient = Patient.objects.create(
                patient_id="", issuer_of_patient_id=h.issuer_of_patient_id, **patient_fields
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
    if own_patient is not None and study.patient_id != own_patient.pk:
        own_patient.delete()  # another ingest created the study first, with its own
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

    def cache_key(self) -> str:
        """What tells this rendering of a file from its others (the cache adds the file's
        SHA-256). It starts with dicom.RENDER_VERSION, so a change to how images are
        drawn is never hidden behind renderings cached before it (those age out)."""
        voi = f"w{self.window.center:g}_{self.window.width:g}" if self.window else self.preset
        return f"r{dicom.RENDER_VERSION}-f{self.frame}-{voi}-s{self.max_size or 0}"


def render_cache() -> RenderCache:
    """The rendered-PNG cache under PRECEDENT_HOME/cache/render, bounded by
    PRECEDENT_RENDER_CACHE_MB (the least recently used renderings go first)."""
    return RenderCache(
        Path(settings.PRECEDENT_HOME) / "cache" / "render", max_bytes=settings.PRECEDENT_RENDER_CACHE_MB * 2**20
    )


def instance_render_png(*, instance: Instance, request: RenderRequest) -> Path:
    """PNG of one frame, rendered once and cached (`render_cache`).

    The cache key starts with the file's SHA-256, so a cached image can never belong to
    other pixel data. Raises RenderError when the pixels cannot be decoded.
    """
    cache = render_cache()
    key = request.cache_key()
    cached = cache.get(instance.sha256, key)
    if cached is not None:
        return cached
    path = dicom_store().path(instance.file_path)
    header, pixels = _decoded_frame(str(path), instance.sha256, request.frame)
    rendered = dicom.render(pixels, header, window=request.window, preset=request.preset, max_size=request.max_size)
    return cache.put(instance.sha256, key, dicom.encode_png(rendered))


@functools.lru_cache(maxsize=4)
def _decoded_frame(path: str, sha256: str, frame: int):  # noqa: ARG001 - sha256 keys the cache
    """Decoding costs more than windowing (100 ms to 0.5 s for compressed films), so
    the last few decoded frames stay in memory while a user drags the window."""
    header = dicom.read_dataset(path, stop_before_pixels=True)
    return dicom.frame_header(header, frame), dicom.decode_frame(path, header, frame)


# --- checking the store against the database -----------------------------------------------

ORPHAN_GRACE_SECONDS = 3600  # a file younger than this may be an ingest's, its row not committed yet


@dataclass
class StoreReport:
    """What `store_check` found. `missing` and `damaged` name SOP Instance UIDs (the rows
    are kept: what to do with them is a person's decision); orphans are relative paths."""

    instances: int = 0
    bytes: int = 0
    hashed: bool = False
    missing: list[str] = field(default_factory=list)  # a row whose file is gone
    damaged: list[str] = field(default_factory=list)  # a file whose size or SHA-256 is not its row's
    orphans: list[str] = field(default_factory=list)  # a stored file no row points at
    orphans_young: int = 0  # orphans left alone: perhaps an ingest under way
    orphans_removed: int = 0
    orphan_renderings: int = 0  # previews of files no row has
    orphan_renderings_bytes: int = 0
    orphan_renderings_removed: int = 0

    @property
    def consistent(self) -> bool:
        """Nothing wrong is left: every row has its whole file, and every orphan found was removed."""
        return (
            not (self.missing or self.damaged)
            and self.orphans_removed == len(self.orphans)
            and (self.orphan_renderings_removed == self.orphan_renderings)
        )


def store_check(
    *, deep: bool = False, fix: bool = False, grace_seconds: float = ORPHAN_GRACE_SECONDS, progress=None
) -> StoreReport:
    """Check PRECEDENT_HOME's DICOM files and renderings against the Instance rows, one
    shard (first two hex digits of the SHA-256) at a time, rows and files side by side.

    Every row needs its file at its size (with `deep`, also its SHA-256). A file no row
    points at is an orphan (a process killed between placing a file and committing its
    row leaves one); with `fix` it is removed, under its SOP Instance UID's ingest lock
    and only if still unreferenced then, and only once older than `grace_seconds` (a
    younger one may be an ingest's whose row has not committed yet). Renderings of files
    no row has, past the same grace, are removed with `fix` too. Rows are never changed.
    """
    store, cache = dicom_store(), render_cache()
    report = StoreReport(hashed=deep)
    rows = (
        Instance.objects.order_by("sha256")
        .values_list("sha256", "file_path", "size", "sop_instance_uid")
        .iterator(chunk_size=10_000)
    )
    pending = next(rows, None)
    cutoff = time.time() - grace_seconds
    for shard in DicomStore.SHARDS:
        shard_rows = []
        while pending is not None and pending[0][:2] <= shard:
            shard_rows.append(pending)
            pending = next(rows, None)
        files = store.shard_files(shard)
        shas = set()
        for sha256, relative, size, sop_instance_uid in shard_rows:
            report.instances += 1
            shas.add(sha256)
            found = files.pop(relative, None)
            if found is None:
                report.missing.append(sop_instance_uid)
                continue
            report.bytes += found.size
            if found.size != size or (deep and store.file_sha256(relative) != sha256):
                report.damaged.append(sop_instance_uid)
        for relative, found in sorted(files.items()):
            report.orphans.append(relative)
            if found.mtime > cutoff:
                report.orphans_young += 1
            elif fix and _remove_orphan(store, relative):
                report.orphans_removed += 1
        for sha256, path, size, mtime in cache.shard_renderings(shard):
            # A young one may be of an instance stored since the rows were read.
            if sha256 not in shas and mtime <= cutoff:
                report.orphan_renderings += 1
                report.orphan_renderings_bytes += size
                if fix:
                    path.unlink(missing_ok=True)
                    report.orphan_renderings_removed += 1
        if progress is not None:
            progress()
    return report


def _remove_orphan(store: DicomStore, relative: str) -> bool:
    """Remove a stored file no row pointed at, unless a row does by now: under the ingest
    lock of the SOP Instance UID it holds (a file that does not read as DICOM was never
    placed by an ingest, which validates first, so it needs no lock)."""
    sha256 = Path(relative).stem
    try:
        sop_instance_uid = str(dicom.read_dataset(store.path(relative), stop_before_pixels=True).SOPInstanceUID)
    except Exception:
        if Instance.objects.filter(file_path=relative).exists():
            return False
        store.remove(relative)
        return True
    _remove_if_unreferenced(store, relative, sop_instance_uid, sha256)
    return not store.path(relative).exists()


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
