"""Encoders, the embedding pipeline and the serving indexes.

- Encoder versions: register a weights file, activate it (the archive is re-embedded
  in the background; search keeps serving the old version until the new index is
  complete).
- Embedding: new instances and new finding boxes are embedded by a background job;
  Embedding rows in PostgreSQL are the source of truth.
- Indexes: each process keeps one `VectorIndex` per (active encoder, kind), loaded
  from PRECEDENT_HOME/index (checked against PostgreSQL, rebuilt if missing or stale)
  and caught up incrementally with new embeddings and tombstones before each search.
"""

from __future__ import annotations

# faiss before torch: two OpenMP runtimes in one process can crash it (DESIGN.md).
from embeddings import index as vector_index  # isort: skip

import dataclasses
import functools
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from precedent.db import write_while_targets_exist
from precedent.lazy import LazyModule
from precedent.tasks import enqueue, job
from studies import dicom
from studies.errors import RenderError
from studies.models import Finding, Instance, Study
from studies.services import dicom_store

from .models import Embedding, EmbeddingTombstone, EncoderVersion

# torch on first use: most processes that load this module (any manage.py command) never embed.
enc = LazyModule("embeddings.encoder")

log = logging.getLogger(__name__)
Kind = Embedding.Kind


# --- encoder versions -----------------------------------------------------------------


def models_dir() -> Path:
    path = Path(settings.PRECEDENT_HOME) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def encoder_register(*, path: Path, name: str = "") -> EncoderVersion:
    """Make a weights file an EncoderVersion (status "ready"), copying it under
    PRECEDENT_HOME/models. Raises EncoderFileError for a file of another format."""
    _model, meta = enc.load_encoder(path)
    name = name or f"{meta.architecture}-d{meta.dim}-{meta.state_sha256[:8]}"
    existing = EncoderVersion.objects.filter(name=name).first()
    if existing is not None:
        if existing.weights_sha256 != meta.state_sha256:
            raise ValueError(f"an encoder named {name!r} exists with other weights")
        return existing
    target = models_dir() / f"{name}.pt"
    if Path(path).resolve() != target.resolve():
        shutil.copyfile(path, target)
    training = meta.training
    return EncoderVersion.objects.create(
        name=name,
        architecture=meta.architecture,
        dim=meta.dim,
        input_size=meta.preprocessing.input_size,
        weights_path=str(target.relative_to(settings.PRECEDENT_HOME)),
        weights_sha256=meta.state_sha256,
        metadata={
            "cohort": training.cohort,
            "trained_at": training.trained_at,
            "epochs": training.epochs,
            "loss_history": training.loss_history,
            "metrics": training.metrics,
            "settings": training.settings,
            "init_weights": training.init_weights,
            "preprocessing": meta.preprocessing.to_dict(),
            "torch_version": meta.torch_version,
        },
    )


def training_patients(encoder: EncoderVersion, patients: set[int]) -> int:
    """How many of `patients` (Patient pks) are in the cohort the encoder was trained
    on (its metadata's cohort); 0 when it names none or the cohort is gone."""
    cohort = (encoder.metadata or {}).get("cohort")
    if not cohort:
        return 0
    trained = set(Study.objects.filter(cohorts__name=cohort).values_list("patient_id", flat=True))
    return len(trained & patients)


def encoder_pooled(*, encoder: EncoderVersion, image_pooling: str, image_size: int, name: str = "") -> EncoderVersion:
    """A new version with `encoder`'s weights whose whole-image embeddings see the film
    at `image_size` (long side) and pool the feature map by `image_pooling` (see
    `enc.Preprocessing`). Nothing is retrained; the new file records its origin. Its
    embeddings are not comparable with the original's, hence a version of its own.
    Raises ValueError for bad settings."""
    model, meta = loaded_encoder(encoder)
    if not isinstance(model, enc.Encoder):
        raise ValueError(f"{encoder.name} ({encoder.architecture}) has no feature map to pool")
    prep = dataclasses.replace(meta.preprocessing, image_pooling=image_pooling, image_size=image_size)
    if prep == meta.preprocessing:
        raise ValueError(f"{encoder.name} already embeds images that way")
    name = name or f"{encoder.name}-{image_pooling}{prep.whole_image_size}"
    training = dataclasses.replace(meta.training, settings={**meta.training.settings, "pooled_from": encoder.name})
    copy = enc.build_encoder(meta.architecture, dim=meta.dim, preprocessing=prep)
    copy.load_state_dict(model.state_dict())
    path = models_dir() / f"{name}.pt"
    if path.exists():
        raise ValueError(f"{path} exists: choose another --name")
    enc.save_encoder(path, copy, training)
    return encoder_register(path=path, name=name)


_active: tuple[float, EncoderVersion | None] = (-1e9, None)


def active_encoder() -> EncoderVersion | None:
    """The version search serves. Every search asks, so the answer is kept for
    PRECEDENT_INDEX_SYNC_SECONDS (a query costs ~1 ms of ORM work here)."""
    global _active
    checked, encoder = _active
    if time.monotonic() - checked >= settings.PRECEDENT_INDEX_SYNC_SECONDS:
        encoder = EncoderVersion.objects.filter(status=EncoderVersion.Status.ACTIVE).first()
        _active = (time.monotonic(), encoder)
    return encoder


def _forget_active() -> None:
    global _active
    _active = (-1e9, None)


def encoder_activate(*, encoder: EncoderVersion, wait: bool = False) -> None:
    """Start serving `encoder`. With no active version it serves at once (and embeds
    the archive in the background); otherwise it is marked "activating", the archive
    is embedded with it in the background, and it takes over only when its index is
    complete. `wait` runs that work in the caller (commands)."""
    if encoder.status == EncoderVersion.Status.ACTIVE:
        return
    with transaction.atomic():
        if active_encoder() is None:
            encoder.status = EncoderVersion.Status.ACTIVE
            encoder.activated_at = timezone.now()
        else:
            encoder.status = EncoderVersion.Status.ACTIVATING
        encoder.save(update_fields=["status", "activated_at"])
    _forget_active()
    if wait:
        finish_activation(encoder_id=encoder.pk)
    else:
        enqueue("embeddings.finish_activation", encoder_id=encoder.pk)


@job("embeddings.finish_activation")
def finish_activation(*, encoder_id: int) -> None:
    """Embed everything with the encoder, build its indexes, then make it the active one."""
    encoder = EncoderVersion.objects.get(pk=encoder_id)
    embed_pending(encoder=encoder)
    for kind in Kind.values:
        serving_index(encoder, kind, save=True)
    with transaction.atomic():
        encoder = EncoderVersion.objects.select_for_update().get(pk=encoder_id)
        if encoder.status == EncoderVersion.Status.ACTIVE:
            return
        EncoderVersion.objects.filter(status=EncoderVersion.Status.ACTIVE).update(status=EncoderVersion.Status.RETIRED)
        encoder.status = EncoderVersion.Status.ACTIVE
        encoder.activated_at = timezone.now()
        encoder.save(update_fields=["status", "activated_at"])
    _forget_active()
    log.info("encoder %s is now active", encoder.name)


def encoder_files_remove(encoder: EncoderVersion) -> None:
    """After an encoder version is deleted: its weights file (unless another version
    uses the same file), its saved indexes and what this process holds of it."""
    weights = Path(settings.PRECEDENT_HOME) / encoder.weights_path
    if encoder.weights_path and not EncoderVersion.objects.filter(weights_path=encoder.weights_path).exists():
        weights.unlink(missing_ok=True)
    shutil.rmtree(Path(settings.PRECEDENT_HOME) / "index" / encoder.name, ignore_errors=True)
    with _served_lock:
        for key in [key for key in _served if key[0] == encoder.pk]:
            del _served[key]
    _forget_active()
    _loaded.cache_clear()


def embedding_encoders() -> list[EncoderVersion]:
    """The versions new images are embedded with: the active one and any activating."""
    return list(
        EncoderVersion.objects.filter(
            status__in=[EncoderVersion.Status.ACTIVE, EncoderVersion.Status.ACTIVATING]
        ).order_by("pk")
    )


@functools.lru_cache(maxsize=2)
def _loaded(name: str, weights_path: str) -> tuple[enc.BaseEncoder, enc.EncoderMeta]:
    model, meta = enc.load_encoder(Path(settings.PRECEDENT_HOME) / weights_path)
    return model.eval(), meta


def loaded_encoder(encoder: EncoderVersion) -> tuple[enc.BaseEncoder, enc.EncoderMeta]:
    """The encoder's model, loaded once per process. Raises EncoderFileError when the
    file is missing, damaged, or holds other weights than the version was registered
    with (vectors from other weights would be compared with the stored ones)."""
    try:
        model, meta = _loaded(encoder.name, encoder.weights_path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise enc.EncoderFileError(f"encoder {encoder.name}: cannot read {encoder.weights_path}: {reason}") from None
    if meta.state_sha256 != encoder.weights_sha256:
        _loaded.cache_clear()
        raise enc.EncoderFileError(
            f"encoder {encoder.name}: {encoder.weights_path} holds other weights than were registered "
            f"({meta.state_sha256[:12]}, registered {encoder.weights_sha256[:12]})"
        )
    return model, meta


# --- decoding images for the encoder --------------------------------------------------


@dataclass
class Picture:
    """One decoded frame, ready to be cropped and preprocessed."""

    instance_id: int
    pixels: np.ndarray
    monochrome1: bool
    # An uploaded DICOM's patient (PatientID, IssuerOfPatientID), so that a search can
    # leave out that patient's own images as it does for a stored query.
    patient: tuple[str, str] | None = None


def instance_picture(instance: Instance, frame: int = 1) -> Picture:
    """Decode one frame of a stored instance. Raises RenderError when it cannot."""
    path = dicom_store().path(instance.file_path)
    header = dicom.read_dataset(path, stop_before_pixels=True)
    pixels = dicom.decode_frame(path, header, frame)
    return Picture(instance.pk, pixels, instance.photometric_interpretation == "MONOCHROME1")


def picture_from_upload(upload) -> Picture:
    """An uploaded query image: DICOM (any transfer syntax we ingest, UIDs not needed),
    PNG or JPEG. Raises SearchError with the reason when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    from studies.errors import IngestError

    from .selectors import SearchError

    store = dicom_store()
    try:
        spooled = store.spool(upload, max_bytes=settings.PRECEDENT_MAX_UPLOAD_BYTES)
    except IngestError as exc:
        raise SearchError(str(exc)) from None
    try:
        with spooled.path.open("rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            try:
                _, header = dicom.read_header(spooled.path, require_uids=False)
                if not header.has_pixel_data:
                    raise SearchError("the DICOM file has no pixel data")
                ds = dicom.read_dataset(spooled.path, stop_before_pixels=True)
                pixels = dicom.decode_frame(spooled.path, ds, (header.number_of_frames + 1) // 2)
            except (IngestError, RenderError) as exc:
                raise SearchError(f"cannot use this DICOM file: {exc}") from None
            patient = (header.patient_id, header.issuer_of_patient_id) if header.patient_id else None
            return Picture(0, pixels, header.photometric_interpretation == "MONOCHROME1", patient)
        try:
            with Image.open(spooled.path) as picture:
                if picture.format not in ("PNG", "JPEG"):
                    raise SearchError(f"upload a DICOM, PNG or JPEG image, not {picture.format}")
                width, height = picture.size
                if width * height > Image.MAX_IMAGE_PIXELS:
                    raise SearchError(
                        f"the image is {width}×{height} pixels: at most {Image.MAX_IMAGE_PIXELS:,} pixels are accepted"
                    )
                pixels = np.asarray(picture.convert("RGB" if picture.mode in ("RGB", "RGBA", "P") else "F"))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
            raise SearchError("cannot decode the upload: send a DICOM, PNG or JPEG image") from None
        return Picture(0, pixels, False)
    finally:
        spooled.discard()


def feedback_record(
    *,
    user,
    result_sop_instance_uid: str,
    rank: int,
    score: float,
    relevant: bool,
    query_sop_instance_uid: str = "",
    query_box: list[float] | None = None,
    result_box: list[float] | None = None,
):
    """Store a "relevant / not relevant" verdict. Raises Instance.DoesNotExist."""
    from .models import SearchFeedback

    result = Instance.objects.get(sop_instance_uid=result_sop_instance_uid)
    query = Instance.objects.get(sop_instance_uid=query_sop_instance_uid) if query_sop_instance_uid else None
    return SearchFeedback.objects.create(
        user=user,
        encoder=active_encoder(),
        query_instance=query,
        query_box=query_box,
        result_instance=result,
        result_box=result_box,
        rank=rank,
        score=score,
        relevant=relevant,
    )


def representative_frame(instance: Instance) -> int:
    # The middle of a multi-frame acquisition shows the anatomy better than its edge.
    return (instance.number_of_frames + 1) // 2


# --- the embedding pipeline -------------------------------------------------------------


@dataclass
class EmbedReport:
    encoder: str
    images: int = 0
    regions: int = 0
    failed: dict[int, str] = field(default_factory=dict)  # instance id → reason


@job("embeddings.embed_instances", merge="instance_ids", settle=lambda: settings.PRECEDENT_EMBED_SETTLE_SECONDS)
def embed_instances(*, instance_ids: list[int]) -> list[EmbedReport]:
    """Embed these instances (whole image and finding boxes) with every encoder that
    embeds new images. Idempotent: what is embedded already is skipped."""
    reports = []
    for encoder in embedding_encoders():
        todo = Instance.objects.filter(pk__in=instance_ids)
        reports.append(embed_pending(encoder=encoder, instances=todo))
    return reports


@job("embeddings.embed_findings", merge="finding_ids")
def embed_findings(*, finding_ids: list[int]) -> None:
    """Region embeddings for new or moved finding boxes."""
    for encoder in embedding_encoders():
        findings = Finding.objects.filter(pk__in=finding_ids, x0__isnull=False).select_related("instance")
        Embedding.objects.filter(encoder=encoder, finding__in=findings).delete()  # a moved box
        instances = Instance.objects.filter(findings__in=findings).distinct()
        embed_pending(encoder=encoder, instances=instances)


def pending_instances(encoder: EncoderVersion, instances=None):
    """Instances with pixels that lack this encoder's image embedding or a region
    embedding for one of their finding boxes."""
    qs = Instance.objects.images() if instances is None else instances.images()
    has_image = Embedding.objects.filter(instance=OuterRef("pk"), encoder=encoder, kind=Kind.IMAGE)
    box_without_region = Finding.objects.filter(instance=OuterRef("pk"), x0__isnull=False).exclude(
        Exists(Embedding.objects.filter(finding=OuterRef("pk"), encoder=encoder))
    )
    return qs.filter(~Exists(has_image) | Exists(box_without_region)).order_by("pk")


def embed_pending(
    *,
    encoder: EncoderVersion,
    instances=None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    replace: bool = False,
) -> EmbedReport:
    """Embed every pending instance (see `pending_instances`) in batches; with
    `replace`, every image (of `instances`, default all) again, each batch's new
    vectors replacing its old ones in one transaction, so that search keeps serving
    the old vectors until then (and an interrupted run leaves no image unembedded).

    Decoding a DICOM frame can cost as much as the CNN (a JPEG 2000 film: 0.5 s), so
    the next batch is decoded in a thread while the model runs on this one.
    """
    model, meta = loaded_encoder(encoder)
    device = enc.pick_device()
    report = EmbedReport(encoder=encoder.name)
    if replace:
        qs = (Instance.objects.images() if instances is None else instances.images()).order_by("pk")
    else:
        qs = pending_instances(encoder, instances)
    todo = list(qs.prefetch_related("findings"))
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    done = 0

    def decode(batch):
        return _decode_batch(batch, meta.preprocessing, encoder, report, replace=replace)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        future = pool.submit(decode, batches[0]) if batches else None
        for i, _batch in enumerate(batches):
            items = future.result()
            if i + 1 < len(batches):
                future = pool.submit(decode, batches[i + 1])
            if items:
                vectors = embed_items(model, meta.preprocessing, items, device)
                _store_vectors(encoder, items, vectors, report, replace=replace)
            done += len(_batch)
            if progress:
                progress(done, len(todo))
    for kind in Kind.values:
        _catch_up_if_served(encoder, kind)
    return report


def embed_items(model: enc.BaseEncoder, prep: enc.Preprocessing, items, device=None) -> np.ndarray:
    """Vectors for (pending, tensor) pairs, in order. Whole images and regions differ
    in input size and pooling (see `enc.Preprocessing`), so each group is its own batch."""
    vectors = np.empty((len(items), model.dim), dtype=np.float32)
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for position, (pending, tensor) in enumerate(items):
        groups.setdefault((enc.pooling_for(prep, pending.box), tuple(tensor.shape)), []).append(position)
    for (pooling, _shape), positions in groups.items():
        vectors[positions] = enc.embed_batch(model, [items[i][1] for i in positions], device, pooling=pooling)
    return vectors


@dataclass
class _Pending:
    """What one tensor will become: an image or a region Embedding."""

    instance_id: int
    frame: int
    finding_id: int | None = None
    box: tuple[float, float, float, float] | None = None


def _decode_batch(
    batch: Sequence[Instance],
    prep: enc.Preprocessing,
    encoder: EncoderVersion,
    report: EmbedReport,
    *,
    replace: bool = False,
) -> list[tuple[_Pending, object]]:
    """Decode and preprocess one batch (in the decode thread, on its own connection):
    what is not embedded yet, or with `replace` everything."""
    try:
        have_image: set[int] = set()
        have_region: set[int] = set()
        if not replace:
            have_image = set(
                Embedding.objects.filter(encoder=encoder, kind=Kind.IMAGE, instance__in=batch).values_list(
                    "instance_id", flat=True
                )
            )
            have_region = set(
                Embedding.objects.filter(encoder=encoder, finding__instance__in=batch).values_list(
                    "finding_id", flat=True
                )
            )
        items: list[tuple[_Pending, object]] = []
        for instance in batch:
            frame = representative_frame(instance)
            try:
                picture = instance_picture(instance, frame)
            except RenderError as exc:
                report.failed[instance.pk] = str(exc)
                continue
            if instance.pk not in have_image:
                tensor = enc.preprocess(picture.pixels, prep, monochrome1=picture.monochrome1)
                items.append((_Pending(instance.pk, frame), tensor))
            for finding in instance.findings.all():
                if finding.box is None or finding.pk in have_region:
                    continue
                box = tuple(finding.box)
                tensor = enc.preprocess(picture.pixels, prep, box, monochrome1=picture.monochrome1)
                items.append((_Pending(instance.pk, frame, finding.pk, box), tensor))
        return items
    finally:
        connection.close()  # this thread's own connection


def _store_vectors(
    encoder: EncoderVersion, items, vectors: np.ndarray, report: EmbedReport, *, replace: bool = False
) -> None:
    rows = []
    for (pending, _), vector in zip(items, vectors, strict=True):
        box = pending.box or (None, None, None, None)
        rows.append(
            Embedding(
                instance_id=pending.instance_id,
                encoder=encoder,
                kind=Kind.REGION if pending.finding_id else Kind.IMAGE,
                frame=pending.frame,
                finding_id=pending.finding_id,
                x0=box[0],
                y0=box[1],
                x1=box[2],
                y1=box[3],
                vector=np.ascontiguousarray(vector, dtype=np.float32).tobytes(),
            )
        )

    def write() -> list[Embedding]:
        # An image or a finding deleted while its batch was embedded gets no row.
        instances = set(Instance.objects.filter(pk__in={r.instance_id for r in rows}).values_list("pk", flat=True))
        findings = set(
            Finding.objects.filter(pk__in={r.finding_id for r in rows if r.finding_id}).values_list("pk", flat=True)
        )
        kept = [r for r in rows if r.instance_id in instances and (r.finding_id is None or r.finding_id in findings)]
        if replace:
            kept = _replacing(encoder, kept)
        # Another worker may have embedded the same instance meanwhile: the unique
        # constraints keep one row, and the loser's vectors are dropped.
        Embedding.objects.bulk_create(kept, ignore_conflicts=True)
        return kept

    stored = write_while_targets_exist(write)
    report.regions += sum(1 for r in stored if r.kind == Kind.REGION)
    report.images += sum(1 for r in stored if r.kind == Kind.IMAGE)


def _replacing(encoder: EncoderVersion, rows: list[Embedding]) -> list[Embedding]:
    """Make room for a batch of re-embedded rows (in the caller's transaction): delete
    the old image rows of these images and the old region rows of these findings, each
    leaving a tombstone (receivers.tombstone). A box moved or cleared since the batch
    was read keeps what the finding's own job made of it: its row here is dropped."""
    regions = [r for r in rows if r.finding_id is not None]
    current = {
        pk: (x0, y0, x1, y1)
        for pk, x0, y0, x1, y1 in Finding.objects.select_for_update()
        .filter(pk__in=[r.finding_id for r in regions])
        .values_list("pk", "x0", "y0", "x1", "y1")
    }
    stale = {r.finding_id for r in regions if current.get(r.finding_id) != (r.x0, r.y0, r.x1, r.y1)}
    rows = [r for r in rows if r.finding_id not in stale]
    images = [r.instance_id for r in rows if r.finding_id is None]
    findings = [r.finding_id for r in rows if r.finding_id is not None]
    Embedding.objects.filter(encoder=encoder).filter(
        Q(kind=Kind.IMAGE, instance_id__in=images) | Q(kind=Kind.REGION, finding_id__in=findings)
    ).delete()
    return rows


def record_tombstones(embeddings: Iterable[Embedding]) -> None:
    EmbeddingTombstone.objects.bulk_create(
        [EmbeddingTombstone(embedding_id=e.pk, encoder_id=e.encoder_id, kind=e.kind) for e in embeddings]
    )


# --- serving indexes ----------------------------------------------------------------------


@dataclass
class _Served:
    index: vector_index.VectorIndex
    last_embedding_id: int
    last_tombstone_id: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    checked_at: float = 0.0  # time.monotonic() of the last catch-up
    recheck_until: float = 0.0  # re-read the windows until then (see _catch_up)


_served: dict[tuple[int, str], _Served] = {}
_served_lock = threading.Lock()
# One lock per (encoder, kind) while its index loads: loading (or rebuilding) one index
# holds up the searches that need it, not those of other indexes.
_loading_locks: dict[tuple[int, str], threading.Lock] = {}
# Rows committed out of id order (two workers embedding, two deletions) are caught by
# re-reading this many ids below the last one seen, at every catch-up for a while
# after the newest id last moved: a straggler's commit does not move it.
_CATCH_UP_WINDOW = 1000
_RECHECK_SECONDS = 60.0


def index_dir(encoder: EncoderVersion, kind: str) -> Path:
    return Path(settings.PRECEDENT_HOME) / "index" / encoder.name / kind


def _index_options() -> dict:
    """The settings every index of this process is built or loaded with."""
    return {
        "index_type": settings.PRECEDENT_INDEX_TYPE,
        "approx_threshold": settings.PRECEDENT_INDEX_APPROX_THRESHOLD,
        "use_gpu": {"auto": None, "on": True, "off": False}[settings.PRECEDENT_INDEX_GPU],
    }


def _new_index(encoder: EncoderVersion, kind: str) -> vector_index.VectorIndex:
    return vector_index.VectorIndex(encoder.dim, kind=kind, encoder_version=encoder.name, **_index_options())


def _embeddings(encoder: EncoderVersion, kind: str):
    return Embedding.objects.filter(encoder=encoder, kind=kind)


def _vectors(rows: Iterable[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = list(rows)
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.float32).reshape(len(rows), dim)
    return ids, vectors


def _chunks(qs, size: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) in id order, a chunk at a time (1M×512 floats is 2 GB)."""
    last = 0
    while True:
        rows = list(qs.filter(id__gt=last).order_by("id").values_list("id", "vector")[:size])
        if not rows:
            return
        last = rows[-1][0]
        yield rows


def index_build(encoder: EncoderVersion, kind: str) -> vector_index.VectorIndex:
    """A fresh index from every embedding of (encoder, kind) in PostgreSQL."""
    qs = _embeddings(encoder, kind)
    parts = [_vectors(rows, encoder.dim) for rows in _chunks(qs)]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
    vectors = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, encoder.dim), np.float32)
    index = _new_index(encoder, kind)
    index.rebuild(ids, vectors)
    return index


def _load_checked(encoder: EncoderVersion, kind: str) -> tuple[vector_index.VectorIndex, bool]:
    """The saved index if it is this encoder's and matches PostgreSQL, caught up
    otherwise; rebuilt when the files are missing or unusable. Also says whether it
    differs from what is saved."""
    directory = index_dir(encoder, kind)
    try:
        index, manifest = vector_index.VectorIndex.load(directory, **_index_options())
        if manifest.encoder_version != encoder.name or manifest.dim != encoder.dim:
            raise vector_index.IndexFileError(f"{directory} holds another encoder's index")
    except vector_index.IndexFileError as exc:
        if directory.exists():
            log.warning("rebuilding the %s %s index: %s", encoder.name, kind, exc)
        return index_build(encoder, kind), True
    changed = False
    db_ids = np.fromiter(_embeddings(encoder, kind).values_list("id", flat=True), dtype=np.int64)
    if vector_index.ids_checksum(db_ids) != manifest.ids_sha256:
        have = index.ids()
        missing = np.setdiff1d(db_ids, have)
        extra = np.setdiff1d(have, db_ids)
        index.remove(extra)
        for rows in _chunks(_embeddings(encoder, kind).filter(id__in=missing.tolist())):
            index.add(*_vectors(rows, encoder.dim))
        log.info("index %s/%s was stale: %d added, %d removed", encoder.name, kind, len(missing), len(extra))
        changed = True
    return index, changed


def index_status(encoder: EncoderVersion, kind: str) -> dict[str, Any]:
    """What an administrator asks of one index: the embeddings in PostgreSQL, the saved
    files (read before anything is loaded: whether they match PostgreSQL), and the index
    this process serves from (type, size, where its searches run)."""
    db_ids = np.fromiter(_embeddings(encoder, kind).values_list("id", flat=True), dtype=np.int64)
    status: dict[str, Any] = {"kind": kind, "embeddings": len(db_ids)}
    try:
        manifest = vector_index.VectorIndex.read_manifest(index_dir(encoder, kind))
    except vector_index.IndexFileError as exc:
        status["saved"] = {"error": str(exc)}
    else:
        index_file = index_dir(encoder, kind) / vector_index.INDEX_FILE
        intact = index_file.is_file() and vector_index.file_sha256(index_file) == manifest.index_sha256
        status["saved"] = {
            "count": manifest.count,
            "index_type": manifest.index_type,
            "created_at": manifest.created_at,
            "file_intact": intact,  # the index file is the one the manifest describes
            "matches_database": intact
            and manifest.encoder_version == encoder.name
            and manifest.ids_sha256 == vector_index.ids_checksum(db_ids),
        }
    index = serving_index(encoder, kind)
    status["serving"] = {
        "count": len(index),
        "index_type": index.index_type,
        "tombstones": index.tombstones,
        "memory_bytes": index.memory_bytes(),
        "searches_on": "gpu" if index.use_gpu else "cpu",
        "gpu_setting": settings.PRECEDENT_INDEX_GPU,
        "faiss_sees_gpu": vector_index.gpu_available(),
    }
    return status


class IndexLoading(Exception):
    """The index is being loaded (or rebuilt) by another thread of this process."""


def serving_index(
    encoder: EncoderVersion, kind: str, *, save: bool = False, wait: bool = True
) -> vector_index.VectorIndex:
    """This process's index for (encoder, kind), loaded once and kept current. With
    `wait=False` (searches), raises IndexLoading instead of waiting while another
    thread loads it: at 1M vectors a check takes seconds and a rebuild minutes."""
    key = (encoder.pk, kind)
    retype = False
    with _served_lock:
        served = _served.get(key)
        loading = _loading_locks.setdefault(key, threading.Lock())
    if served is None:
        if not loading.acquire(blocking=wait):
            raise IndexLoading(f"the {kind} index of encoder {encoder.name} is being loaded: ask again in a moment")
        try:
            with _served_lock:
                served = _served.get(key)
            if served is None:  # not loaded by the search that held the lock before
                marks = _marks(encoder, kind)
                index, changed = _load_checked(encoder, kind)
                served = _Served(index, *marks)
                with _served_lock:
                    _served[key] = served
                save = save or changed
                retype = index.index_type != index.wanted_type()
        finally:
            loading.release()
    if retype:
        # PRECEDENT_INDEX_TYPE (or the size, or a GPU) asks for another type than was
        # saved: rebuilt aside, outside the lock, while searches use the loaded one.
        log.info("rebuilding the %s %s index as %s (saved as %s)", encoder.name, kind, served.index.wanted_type(),
                 served.index.index_type)  # fmt: skip
        served.index.compact()
        save = True
    _catch_up(encoder, kind, served, force=save)
    if save:
        served.index.save(index_dir(encoder, kind), encoder_version=encoder.name)
    return served.index


def _marks(encoder: EncoderVersion, kind: str) -> tuple[int, int]:
    """The newest embedding and tombstone ids, in one round trip (both index-only)."""
    sql = (
        f'SELECT (SELECT max(id) FROM "{Embedding._meta.db_table}" WHERE encoder_id = %s AND kind = %s), '
        f'(SELECT max(id) FROM "{EmbeddingTombstone._meta.db_table}" WHERE encoder_id = %s AND kind = %s)'
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [encoder.pk, kind, encoder.pk, kind])
        newest_embedding, newest_tombstone = cursor.fetchone()
    return newest_embedding or 0, newest_tombstone or 0


def _catch_up(encoder: EncoderVersion, kind: str, served: _Served, *, force: bool = False) -> None:
    """Add embeddings and apply tombstones committed since this process last looked.

    Searches check at most every PRECEDENT_INDEX_SYNC_SECONDS (a new study becomes
    searchable in other processes within that time); writers in this process force it.
    Ids come from sequences, but transactions commit in any order: a row with an id
    below the newest one seen can appear later. So for _RECHECK_SECONDS after the
    newest ids move, each catch-up re-reads the last _CATCH_UP_WINDOW ids of both
    tables (index-only scans) and applies what the index lacks. A transaction open
    longer than that which commits out of order is caught when the index is next
    loaded (`_load_checked` compares every id).
    """
    now = time.monotonic()
    if not force and now - served.checked_at < settings.PRECEDENT_INDEX_SYNC_SECONDS:
        return
    with served.lock:
        served.checked_at = now
        last_embedding, last_tombstone = _marks(encoder, kind)
        if last_embedding > served.last_embedding_id or last_tombstone > served.last_tombstone_id:
            served.recheck_until = now + _RECHECK_SECONDS
        elif now >= served.recheck_until:
            return
        window = np.fromiter(
            _embeddings(encoder, kind)
            .filter(id__gt=served.last_embedding_id - _CATCH_UP_WINDOW)
            .values_list("id", flat=True),
            dtype=np.int64,
        )
        missing = np.setdiff1d(window, served.index.present(window))
        for rows in _chunks(_embeddings(encoder, kind).filter(id__in=missing.tolist())):
            served.index.add(*_vectors(rows, encoder.dim))
        gone = np.fromiter(
            EmbeddingTombstone.objects.filter(
                encoder=encoder, kind=kind, id__gt=served.last_tombstone_id - _CATCH_UP_WINDOW
            ).values_list("embedding_id", flat=True),
            dtype=np.int64,
        )
        served.index.remove(served.index.present(gone))
        served.last_embedding_id = max(served.last_embedding_id, last_embedding)
        served.last_tombstone_id = max(served.last_tombstone_id, last_tombstone)


def _catch_up_if_served(encoder: EncoderVersion, kind: str) -> None:
    served = _served.get((encoder.pk, kind))
    if served is not None:
        _catch_up(encoder, kind, served, force=True)


def serve_prebuilt(encoder: EncoderVersion, kind: str, index: vector_index.VectorIndex) -> None:
    """Serve an index built elsewhere from this encoder's embeddings (bench_search
    builds one while it measures the bare index, and reuses it here)."""
    with _served_lock:
        _served[(encoder.pk, kind)] = _Served(index, *_marks(encoder, kind))


def warm_indexes() -> list[str]:
    """Load the active encoder's image and lesion indexes now (checked against
    PostgreSQL, rebuilt if missing or stale), so that a serving process does this at
    start rather than in its first search. Returns what it loaded; a failure is logged,
    never raised (searches would load the index themselves)."""
    loaded = []
    try:
        encoder = active_encoder()
        if encoder is not None:
            for kind in (Embedding.Kind.IMAGE, Embedding.Kind.REGION):
                started = time.perf_counter()
                index = serving_index(encoder, kind)
                loaded.append(f"{encoder.name}/{kind}: {len(index)} vectors in {time.perf_counter() - started:.1f} s")
        log.info("search indexes ready: %s", "; ".join(loaded) or "no active encoder")
    except Exception:  # the database not migrated yet, a damaged file: searches will say
        log.exception("warming the search indexes failed")
    finally:
        if threading.current_thread() is not threading.main_thread():
            connection.close()  # the background thread's own connection
    return loaded


def warm_indexes_in_background() -> threading.Thread:
    thread = threading.Thread(target=warm_indexes, name="precedent-warm-indexes", daemon=True)
    thread.start()
    return thread


def forget_indexes() -> None:
    """Drop this process's indexes (tests; after PRECEDENT_HOME changes)."""
    with _served_lock:
        _served.clear()
    _forget_active()
    _loaded.cache_clear()
