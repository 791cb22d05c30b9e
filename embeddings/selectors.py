"""Similar-case search: a query (an instance, a box on it, or an uploaded image) →
the most similar prior images or lesions, with their known outcomes."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.db import connection
from django.db.models import Q, QuerySet

from precedent.lazy import LazyModule
from studies.models import Finding, Instance

from . import services
from .models import Embedding, EncoderVersion, SearchFeedback

# torch on first use: most processes that load this module (any manage.py command) never embed.
enc = LazyModule("embeddings.encoder")
log = logging.getLogger(__name__)

Kind = Embedding.Kind
MAX_K = 100


class SearchError(ValueError):
    """A query that cannot be answered as asked (bad box, undecodable image)."""


@dataclass(frozen=True)
class SearchFilters:
    modality: str = ""
    body_part: str = ""
    laterality: str = ""
    view_position: str = ""
    finding_class: str = ""
    pathology: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    cohort: str = ""
    exclude_same_patient: bool = True

    # The filters that narrow the candidates (exclude_same_patient only drops a few).
    NARROWING = (
        "modality",
        "body_part",
        "laterality",
        "view_position",
        "finding_class",
        "pathology",
        "date_from",
        "date_to",
        "cohort",
    )

    def narrows(self) -> bool:
        return any(getattr(self, name) for name in self.NARROWING)

    def apply(self, qs: QuerySet[Embedding]) -> QuerySet[Embedding]:
        series = "instance__series__"
        study = series + "study__"
        if self.modality:
            qs = qs.filter(**{series + "modality": self.modality.upper()})
        if self.body_part:
            qs = qs.filter(**{series + "body_part": self.body_part.upper()})
        if self.laterality:
            qs = qs.filter(instance__laterality=self.laterality.upper())
        if self.view_position:
            qs = qs.filter(instance__view_position=self.view_position.upper())
        if self.date_from:
            qs = qs.filter(**{study + "study_date__gte": self.date_from})
        if self.date_to:
            qs = qs.filter(**{study + "study_date__lte": self.date_to})
        if self.cohort:
            qs = qs.filter(**{study + "cohorts__name": self.cohort})
        if self.finding_class or self.pathology:
            # A region hit is judged by its own finding; an image hit by any of its findings.
            finding = Q()
            if self.finding_class:
                finding &= Q(abnormality_class__iexact=self.finding_class)
            if self.pathology:
                finding &= Q(pathology=self.pathology)
            matching = Finding.objects.filter(finding)
            qs = qs.filter(
                Q(kind=Kind.REGION, finding__in=matching) | Q(kind=Kind.IMAGE, instance__findings__in=matching)
            )
        return qs.distinct()


@dataclass
class Hit:
    """One result: the image (or lesion) found, what is known of it, and its score.

    Plain values, read in two queries: building model instances for every related
    row cost more than the FAISS search itself."""

    embedding_id: int
    rank: int
    score: float
    kind: str
    box: list[float] | None
    finding: dict[str, str] | None  # the lesion a region hit is, {"pathology", "abnormality_class"}
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    modality: str
    laterality: str
    view_position: str
    study_date: dt.date | None
    rows: int | None
    columns: int | None
    findings: list[dict[str, Any]]  # every finding of the image: pathology, abnormality_class, box


@dataclass
class SearchResults:
    # "ok", or why there are no results: "no_encoder", "no_index", "empty_index",
    # "index_loading", "encoder_unavailable"
    status: str
    message: str
    encoder: str = ""
    kind: str = Kind.IMAGE
    k: int = 10
    hits: list[Hit] = field(default_factory=list)
    query: dict[str, Any] = field(default_factory=dict)


def similar_cases(
    *,
    instance: Instance | None = None,
    box: tuple[float, float, float, float] | None = None,
    image: np.ndarray | None = None,
    vector: np.ndarray | None = None,
    monochrome1: bool = False,
    patient: tuple[str, str] | None = None,
    k: int = 10,
    filters: SearchFilters | None = None,
    kind: str | None = None,
    encoder: EncoderVersion | None = None,
) -> SearchResults:
    """The k most similar images (or, for a box query, lesions) to the query.

    Query with a stored `instance` (whole image, or a `box` on it in image pixels),
    with a decoded `image` (an upload), or with a `vector` the caller embedded with
    the same encoder. `kind` chooses what to search: whole images or finding regions
    (default: regions for a box, images otherwise). `encoder` defaults to the active
    version. Filters restrict the candidates; the query's own patient (a stored
    query's, or an uploaded DICOM's `patient`: PatientID and issuer) is left out unless
    asked. Never fewer than k results when k candidates pass the filters.
    """
    filters = filters or SearchFilters()
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k must be between 1 and {MAX_K}")
    if sum(q is not None for q in (instance, image, vector)) != 1:
        raise SearchError("give one of an instance, an image or a vector to search with")
    kind = kind or (Kind.REGION if box is not None else Kind.IMAGE)
    if kind not in Kind.values:
        raise SearchError(f"kind must be one of {', '.join(Kind.values)}")
    if box is not None:
        if vector is not None:
            raise SearchError("a box needs an image or an instance, not a vector")
        box = _checked_box(box, instance, image)

    encoder = encoder or services.active_encoder()
    query = {"sop_instance_uid": instance.sop_instance_uid if instance else None, "box": list(box) if box else None}
    if encoder is None:
        ready = EncoderVersion.objects.filter(status=EncoderVersion.Status.READY).order_by("-pk").first()
        hint = (
            f"activate one with `manage.py encoder activate {ready.name}`"
            if ready is not None
            else "train one with `manage.py train_encoder`"
        )
        return SearchResults("no_encoder", f"no encoder is active yet: {hint}", kind=kind, k=k, query=query)
    base = dict(encoder=encoder.name, kind=kind, k=k, query=query)
    try:
        index = services.serving_index(encoder, kind, wait=False)
    except services.IndexLoading as exc:  # loading at start, or rebuilt: say so, don't hang
        return SearchResults("index_loading", str(exc), **base)
    if len(index) == 0:
        return SearchResults("empty_index", f"no {kind} embeddings yet for encoder {encoder.name}", **base)

    if vector is not None:
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != encoder.dim:
            raise SearchError(f"vector has {vector.shape[1]} values; encoder {encoder.name} makes {encoder.dim}")
    else:
        try:
            vector = _query_vector(encoder, instance, box, image, monochrome1)
        except enc.EncoderFileError as exc:  # an administrator's problem, not the query's
            log.error("search cannot embed its query: %s", exc)
            return SearchResults("encoder_unavailable", str(exc), **base)
    candidates = Embedding.objects.filter(encoder=encoder, kind=kind)
    allowed = exclude = None
    if filters.exclude_same_patient and instance is not None:
        exclude = np.fromiter(
            candidates.filter(instance__series__study__patient_id=instance.series.study.patient_id).values_list(
                "id", flat=True
            ),
            dtype=np.int64,
        )
    elif filters.exclude_same_patient and patient is not None:
        exclude = np.fromiter(
            candidates.filter(
                instance__series__study__patient__patient_id=patient[0],
                instance__series__study__patient__issuer_of_patient_id=patient[1],
            ).values_list("id", flat=True),
            dtype=np.int64,
        )
    elif instance is not None and box is None:
        # Without a patient exclusion the query's own image would come first.
        exclude = np.fromiter(candidates.filter(instance=instance).values_list("id", flat=True), dtype=np.int64)
    if filters.narrows():
        hits = _over_fetched(index, vector, k, exclude, filters, candidates)
        if hits is not None:
            return SearchResults("ok", "", hits=hits, **base)
        allowed = np.fromiter(filters.apply(candidates).values_list("id", flat=True), dtype=np.int64)
    if allowed is not None and len(allowed) == 0:
        return SearchResults("ok", "no images pass the filters", **base)
    for _attempt in range(3):
        scores, ids = index.search(vector, k, allowed_ids=allowed, exclude_ids=exclude)
        hits, gone = _hits(scores[0], ids[0])
        if not gone:
            break
        # Deleted since this process's index last caught up (ids are never reused):
        # drop them here and now, and ask again so that k results still come back.
        index.remove(gone)
    return SearchResults("ok", "", hits=hits, **base)


# Over-fetch rounds for a filtered search: k × each factor nearest neighbours, of which
# those that pass the filters are kept.
OVER_FETCH_FACTORS = (4, 32)


def _over_fetched(index, vector, k: int, exclude, filters: SearchFilters, candidates) -> list[Hit] | None:
    """A filtered search through more neighbours than asked: the nearest k × factor,
    their ids checked against the filters in one indexed query, the first k that pass
    kept. A filter most images pass (the viewer's "Find similar" filters by the image's
    modality) is answered this way without listing every passing id, which at 1M
    embeddings costs about 0.3 s. The same top k as the exact filtered search whenever k
    pass among those fetched (they are the nearest of all). None when fewer pass even
    in the widest round (none at all: the caller says why), or when a hit's row is
    gone: the caller then lists the passing ids and searches among them."""
    size = len(index)
    for factor in OVER_FETCH_FACTORS:
        fetch = min(size, k * factor)
        scores, ids = index.search(vector, fetch, exclude_ids=exclude)
        fetched = [int(i) for i in ids[0] if i >= 0]
        passing = set(filters.apply(candidates.filter(id__in=fetched)).values_list("id", flat=True))
        kept = [(score, i) for score, i in zip(scores[0], ids[0], strict=True) if int(i) in passing][:k]
        if len(kept) == k or (fetch >= size and kept):
            hits, gone = _hits(np.array([s for s, _ in kept]), np.array([i for _, i in kept], dtype=np.int64))
            return None if gone else hits
    return None


def _checked_box(box, instance: Instance | None, image: np.ndarray | None) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise SearchError("box must be four numbers [x0, y0, x1, y1] in image pixels") from None
    rows, columns = (instance.rows, instance.columns) if instance is not None else image.shape[:2]
    if not (rows and columns):
        raise SearchError("the query image has no pixel size")
    if x1 <= x0 or y1 <= y0:
        raise SearchError("box has zero area: x1 must exceed x0 and y1 exceed y0")
    if x0 < 0 or y0 < 0 or x1 > columns or y1 > rows:
        raise SearchError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is outside the {columns}×{rows} image")
    return x0, y0, x1, y1


def _query_vector(encoder: EncoderVersion, instance, box, image, monochrome1) -> np.ndarray:
    if instance is not None and box is None:
        stored = Embedding.objects.filter(encoder=encoder, kind=Kind.IMAGE, instance=instance).first()
        if stored is not None:
            return stored.as_array()[None, :]
    model, meta = services.loaded_encoder(encoder)
    if instance is not None:
        if not instance.is_previewable:
            raise SearchError(f"instance {instance.sop_instance_uid} has no image to search with")
        try:
            picture = services.instance_picture(instance, services.representative_frame(instance))
        except Exception as exc:  # RenderError: the stored pixels cannot be decoded
            raise SearchError(str(exc)) from None
        image, monochrome1 = picture.pixels, picture.monochrome1
    # Exactly as the pipeline embeds the index (size and pooling), or scores mean nothing.
    tensor = enc.preprocess(image, meta.preprocessing, box, monochrome1=monochrome1)
    return enc.embed_batch(model, [tensor], pooling=enc.pooling_for(meta.preprocessing, box))


def _hits_sql() -> str:
    table = {m.__name__: m._meta.db_table for m in (Embedding, Instance, Finding)}
    from studies.models import Patient, Series, Study

    table.update({m.__name__: m._meta.db_table for m in (Series, Study, Patient)})
    return f"""
        SELECT e.id, e.kind, e.x0, e.y0, e.x1, e.y1,
               i.sop_instance_uid, i.laterality, i.view_position, i."rows", i."columns",
               s.series_instance_uid, s.modality, st.study_instance_uid, st.study_date, p.patient_id,
               f.pathology, f.abnormality_class,
               (SELECT coalesce(json_agg(json_build_object(
                           'pathology', g.pathology,
                           'abnormality_class', g.abnormality_class,
                           'box', CASE WHEN g.x0 IS NULL THEN NULL ELSE json_build_array(g.x0, g.y0, g.x1, g.y1) END
                       ) ORDER BY g.id), '[]'::json)
                  FROM "{table["Finding"]}" g WHERE g.instance_id = i.id) AS findings
          FROM "{table["Embedding"]}" e
          JOIN "{table["Instance"]}" i ON i.id = e.instance_id
          JOIN "{table["Series"]}" s ON s.id = i.series_id
          JOIN "{table["Study"]}" st ON st.id = s.study_id
          JOIN "{table["Patient"]}" p ON p.id = st.patient_id
          LEFT JOIN "{table["Finding"]}" f ON f.id = e.finding_id
         WHERE e.id = ANY(%s)
    """


def _hits(scores: np.ndarray, ids: np.ndarray) -> tuple[list[Hit], list[int]]:
    """The hits' images, studies and findings in one statement, and the ids whose rows
    are gone (deleted since the index last caught up). Raw SQL: through the ORM the
    same reads cost 4.4 ms a search on these CPUs, ten times the FAISS search."""
    found = [(float(s), int(i)) for s, i in zip(scores, ids, strict=True) if i >= 0]
    if not found:
        return [], []
    with connection.cursor() as cursor:
        cursor.execute(_hits_sql(), [[i for _, i in found]])
        rows = {row[0]: row for row in cursor.fetchall()}
    gone = [embedding_id for _, embedding_id in found if embedding_id not in rows]
    hits = []
    for rank, (score, embedding_id) in enumerate(((s, i) for s, i in found if i in rows), start=1):
        row = rows[embedding_id]
        (_, kind, x0, y0, x1, y1, sop, laterality, view, n_rows, n_columns, series_uid, modality, study_uid,
         study_date, patient_id, pathology, abnormality_class, findings) = row  # fmt: skip
        hits.append(
            Hit(
                embedding_id=embedding_id,
                rank=rank,
                score=score,
                kind=kind,
                box=None if x0 is None else [x0, y0, x1, y1],
                finding={"pathology": pathology, "abnormality_class": abnormality_class} if pathology else None,
                sop_instance_uid=sop,
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                patient_id=patient_id,
                modality=modality,
                laterality=laterality,
                view_position=view,
                study_date=study_date,
                rows=n_rows,
                columns=n_columns,
                findings=findings,
            )
        )
    return hits, gone


LABELS = ("abnormal", "pathology", "abnormality_class")
_PATHOLOGY_ORDER = ["malignant", "benign", "unknown", "normal"]


def image_label(findings: list[Finding], label: str) -> str | None:
    """One image's ground truth for evaluation and supervised training.

    abnormal: "abnormal" / "normal"; pathology: the worst of malignant > benign >
    unknown > normal; abnormality_class: the class of its first lesion, or "normal".
    None when the image has no ground truth at all.
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}")
    if not findings:
        return None
    lesions = sorted((f for f in findings if f.pathology != Finding.Pathology.NORMAL), key=lambda f: f.pk)
    if label == "abnormal":
        return "abnormal" if lesions else "normal"
    if label == "pathology":
        present = {f.pathology for f in findings}
        return next(p for p in _PATHOLOGY_ORDER if p in present)
    return (lesions[0].abnormality_class or "abnormal") if lesions else "normal"


@dataclass
class LabelledImage:
    instance: Instance
    label: str | None
    patient_id: int

    box = None  # the whole image (a LabelledRegion has its finding's box)


@dataclass
class LabelledRegion:
    """One finding box of a cohort image, the query unit of "similar lesions"."""

    finding: Finding
    label: str
    patient_id: int

    @property
    def instance(self) -> Instance:
        return self.finding.instance

    @property
    def box(self) -> tuple[float, float, float, float]:
        return tuple(self.finding.box)


REGION_LABELS = ("pathology", "abnormality_class")


def cohort_regions(cohort: str, label: str) -> list[LabelledRegion]:
    """The finding boxes of the cohort's images, each labelled by its own finding:
    its pathology (benign, malignant, unknown) or its abnormality class."""
    if label not in REGION_LABELS:
        raise ValueError(f"a region's label is one of {', '.join(REGION_LABELS)} (every region is a lesion)")
    findings = (
        Finding.objects.filter(
            instance__in=Instance.objects.images().filter(series__study__cohorts__name=cohort),
            x0__isnull=False,
        )
        .exclude(pathology=Finding.Pathology.NORMAL)
        .select_related("instance__series__study")
        .order_by("pk")
    )
    return [
        LabelledRegion(
            f,
            f.pathology if label == "pathology" else (f.abnormality_class or "unclassified"),
            f.instance.series.study.patient_id,
        )
        for f in findings
    ]


def cohort_images(cohort: str, label: str = "abnormal") -> list[LabelledImage]:
    """The cohort's images with pixels, each with its label and its patient."""
    instances = (
        Instance.objects.images()
        .filter(series__study__cohorts__name=cohort)
        .select_related("series__study")
        .prefetch_related("findings")
        .order_by("pk")
        .distinct()
    )
    return [LabelledImage(i, image_label(list(i.findings.all()), label), i.series.study.patient_id) for i in instances]


FILTER_VALUES_CACHE_SECONDS = 300


def search_filter_values() -> dict[str, list[str]]:
    """The values each search filter can take in this archive, for menus.

    DISTINCT over every instance is a full scan at a million images, so the answer
    is cached for a few minutes: a new modality appears in the menus a little later.
    """
    from django.core.cache import cache

    from studies import selectors as study_selectors
    from studies.models import Cohort, Series

    def distinct(qs, name: str) -> list[str]:
        return list(qs.exclude(**{name: ""}).order_by(name).values_list(name, flat=True).distinct())

    def compute() -> dict[str, list[str]]:
        return {
            "modality": study_selectors.study_modalities(),
            "body_part": distinct(Series.objects, "body_part"),
            "laterality": distinct(Instance.objects, "laterality"),
            "view_position": distinct(Instance.objects, "view_position"),
            "finding_class": distinct(Finding.objects, "abnormality_class"),
            "cohort": list(Cohort.objects.order_by("name").values_list("name", flat=True)),
        }

    return cache.get_or_set("search-filter-values", compute, FILTER_VALUES_CACHE_SECONDS)


# --- feedback ---------------------------------------------------------------------------


def box_key(box) -> tuple[float, ...] | None:
    """A box as a lookup key: its corners to 0.01 px (JSON round trips change the last bits)."""
    return tuple(round(float(v), 2) for v in box) if box else None


def feedback_given(*, user, query_uid: str, query_box, result_uids: list[str]) -> dict[tuple, str]:
    """The user's latest verdict ("relevant" / "not-relevant") on each result of this
    query, keyed by (result SOP Instance UID, box_key(result box)): what the search page
    shows as already given. An uploaded query names no stored image, so none is found."""
    if not query_uid or not result_uids or not getattr(user, "is_authenticated", False):
        return {}
    rows = (
        SearchFeedback.objects.filter(
            user=user, query_instance__sop_instance_uid=query_uid, result_instance__sop_instance_uid__in=result_uids
        )
        .order_by("created_at", "pk")
        .values_list("query_box", "result_instance__sop_instance_uid", "result_box", "relevant")
    )
    wanted = box_key(query_box)
    return {
        (uid, box_key(result_box)): "relevant" if relevant else "not-relevant"
        for stored_box, uid, result_box, relevant in rows
        if box_key(stored_box) == wanted
    }
